"""Pipeline parallelism through DeepSpeed's pipeline engine (real DeepSpeed, CPU ranks, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launchers import NO_DROPOUT, TINY_GPT2, assert_losses_close, losses, run_training

STEP = ["--batch-size", "2", "--gradient-accumulation-steps", "2"]


def _zero1(tmp_path: Path) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


@pytest.fixture(scope="module")
def unpipelined(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    args = TINY_GPT2 + NO_DROPOUT + STEP + ["--train-iters", "10"] + _zero1(tmp_path_factory.mktemp("flat"))
    return losses(run_training(1, args).stdout)


@pytest.mark.parametrize("pipe,model", [(2, 1), (2, 2)])
def test_pipelined_equals_unpipelined(pipe: int, model: int, unpipelined: dict[int, str], tmp_path: Path) -> None:
    args = TINY_GPT2 + NO_DROPOUT + STEP + ["--train-iters", "10", "--pipe-parallel-size", str(pipe),
                                           "--model-parallel-size", str(model)] + _zero1(tmp_path)
    out = run_training(pipe * model, args)
    assert "backend deepspeed-pipeline" in out.stdout
    assert_losses_close(losses(out.stdout), unpipelined)


@pytest.mark.parametrize("checkpointing", [["--checkpoint-activations"],
                                           ["--checkpoint-activations", "--deepspeed-activation-checkpointing"]],
                         ids=["mpu", "deepspeed"])
def test_pipelined_with_activation_checkpointing_equals_unpipelined(checkpointing: list[str],
                                                                    unpipelined: dict[int, str],
                                                                    tmp_path: Path) -> None:
    """The first stage's embedding (token ids in, nothing requiring grad) is not recomputed: a
    reentrant checkpoint around it failed the first backward ("element 0 of tensors does not
    require grad")."""
    args = TINY_GPT2 + NO_DROPOUT + STEP + ["--train-iters", "10", "--pipe-parallel-size", "2"] + checkpointing
    out = run_training(2, args + _zero1(tmp_path))
    assert_losses_close(losses(out.stdout), unpipelined)


def test_pipelined_run_resumes_exactly(demo_corpus: Path, tmp_path: Path) -> None:
    common = TINY_GPT2 + STEP + ["--pipe-parallel-size", "2", "--lr-decay-iters", "10"] + _zero1(tmp_path)
    straight = losses(run_training(2, common + ["--train-iters", "10"]).stdout)
    save = str(tmp_path / "ckpt")
    run_training(2, common + ["--train-iters", "5", "--save", save])
    assert (tmp_path / "ckpt" / "iter_0000005" / "complete").is_file()
    resumed = losses(run_training(2, common + ["--train-iters", "10", "--load", save]).stdout)
    assert resumed == {i: straight[i] for i in range(6, 11)}


def test_tools_read_pipelined_checkpoints(demo_corpus: Path, tmp_path: Path) -> None:
    """to-hf of a pipe 2 x model 2 checkpoint equals to-hf of the same training unpipelined;
    generation loads the pipelined checkpoint."""
    import subprocess
    import sys

    from launchers import DEMO_DIR, REPO
    from safetensors.torch import load_file

    common = TINY_GPT2 + NO_DROPOUT + STEP + ["--train-iters", "3"] + _zero1(tmp_path)
    run_training(4, common + ["--pipe-parallel-size", "2", "--model-parallel-size", "2", "--save", str(tmp_path / "pipe")])
    run_training(1, common + ["--save", str(tmp_path / "flat")])
    exported = {}
    for name in ("pipe", "flat"):
        subprocess.run([sys.executable, "tools/convert_checkpoint.py", "to-hf", "--load", str(tmp_path / name),
                        "--output", str(tmp_path / f"hf_{name}"), "--vocab-file", str(DEMO_DIR / "gpt2-vocab.json"),
                        "--merge-file", str(DEMO_DIR / "gpt2-merges.txt")], cwd=REPO, check=True, capture_output=True)
        exported[name] = load_file(str(tmp_path / f"hf_{name}" / "model.safetensors"))
    assert exported["pipe"].keys() == exported["flat"].keys()
    for key, tensor in exported["flat"].items():
        torch.testing.assert_close(exported["pipe"][key], tensor, atol=1e-5, rtol=1e-4, msg=key)
    prompts, output = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("The module\n")
    run_training(1, ["--load", str(tmp_path / "pipe"), "--vocab-file", str(DEMO_DIR / "gpt2-vocab.json"),
                     "--merge-file", str(DEMO_DIR / "gpt2-merges.txt"), "--make-vocab-size-divisible-by", "40",
                     "--greedy", "--out-seq-length", "12", "--sample-input-file", str(prompts),
                     "--sample-output-file", str(output)], script="generate_samples.py")
    assert json.loads(output.read_text().splitlines()[0])["prompt"] == "The module"
