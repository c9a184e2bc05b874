"""Resuming a checkpoint at another precision. The optimizer state of an fp32 run and of an fp16/bf16
run differ (Megatron: the optimizer's own state against ``FP16_Optimizer``'s with fp32 masters;
DeepSpeed: ``zero_pp_rank_*`` against ``bf16_zero_pp_rank_*`` files), so the resume is refused with
one line naming both precisions and the flag that resumes, never a traceback or DeepSpeed's missing
file, and the checkpoint is left as it was. Found after the demo's default became bf16: its old fp32
checkpoints were refused as "corrupt or from another model/ZeRO setup"."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from launchers import TINY_GPT2, assert_one_line_error, losses, run_script


def _args(save: Path, iterations: int, precision: str, deepspeed: Path | None, *extra: str) -> list[str]:
    args = [*TINY_GPT2, "--batch-size", "2", "--train-iters", str(iterations), "--save", str(save),
            "--load", str(save), "--save-interval", "4", *extra]
    if precision == "bf16":
        args.append("--bf16")
    if deepspeed is not None:
        args += ["--deepspeed", "--deepspeed_config", str(deepspeed)]
    return args


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


def _config(tmp_path: Path, path: str) -> Path | None:
    if path == "megatron":
        return None
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": int(path[-1])}}))
    return config


# ZeRO 0 keeps the whole optimizer in the model-states file (no bf16_ file names to tell by).
@pytest.mark.parametrize("path", ["megatron", "zero0", "zero1"])
@pytest.mark.parametrize("saved, resumed", [("fp32", "bf16"), ("bf16", "fp32")])
def test_resume_at_another_precision_is_one_line(tmp_path: Path, path: str, saved: str, resumed: str) -> None:
    config = _config(tmp_path, path)
    save = tmp_path / "run"
    run_script("pretrain_gpt2.py", _args(save, 4, saved, config))
    before = _digests(save)
    result = run_script("pretrain_gpt2.py", _args(save, 8, resumed, config), check=False)
    assert_one_line_error(result, "was saved by a run in", saved, f"this run is in {resumed}",
                          "Resume at the checkpoint's precision")
    assert _digests(save) == before, "the refused resume changed the checkpoint"
    # the flag the line names resumes it
    result = run_script("pretrain_gpt2.py", _args(save, 6, saved, config))
    assert 6 in losses(result.stdout), result.stdout[-2000:]


@pytest.mark.parametrize("path", ["megatron", "zero1"])
def test_resume_at_another_precision_without_optimizer_state(tmp_path: Path, path: str) -> None:
    """The other way out the line names: the weights and iteration, with a fresh optimizer (on
    DeepSpeed the file-name check refused it, though the engine loads the weights alone)."""
    config = _config(tmp_path, path)
    save = tmp_path / "run"
    run_script("pretrain_gpt2.py", _args(save, 4, "fp32", config))
    result = run_script("pretrain_gpt2.py", _args(save, 6, "bf16", config, "--no-load-optim"))
    assert 6 in losses(result.stdout), result.stdout[-2000:]


def test_a_zero0_bf16_checkpoint_reshards_from_its_fp32_masters(tmp_path: Path) -> None:
    """Found by the hostile review: resharding a ZeRO 0 bf16 checkpoint announced "fp32 master
    weights" but took the bf16 weights as masters (DeepSpeed's wrapper keeps them in fp32_groups)."""
    import torch

    from megatron.checkpoint.convert import read_checkpoint_directory

    save = tmp_path / "run"
    run_script("pretrain_gpt2.py", _args(save, 4, "bf16", _config(tmp_path, "zero0")))
    directory = save / "iter_0000004"
    read = read_checkpoint_directory(str(directory), deepspeed_optimizer=True)
    raw = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    saved = [master for group in raw["optimizer"]["fp32_groups"] for master in group]
    masters = list(read.optimizer["masters"].values())
    assert len(masters) == len(saved) and all(m.dtype == torch.float32 for m in masters)
    assert all(torch.equal(m, s) for m, s in zip(masters, saved))
    weights = {name: read.model[name] for name in read.optimizer["masters"] if name in read.model}
    assert weights and any(not torch.equal(read.optimizer["masters"][name], weight.float())
                           for name, weight in weights.items())
