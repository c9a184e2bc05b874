"""The DeepSpeed path (real DeepSpeed, CPU ranks, gloo) against the baseline path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launchers import NO_DROPOUT, REPO, TINY_GPT2, assert_losses_close, losses, run_training

ITERS = ["--train-iters", "20"]


def ds_args(tmp_path: Path, stage: int, **extra: object) -> list[str]:
    config = {"zero_optimization": {"stage": stage}, **extra}
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", "--deepspeed_config", str(path)]


@pytest.fixture(scope="module")
def baseline_dp2(demo_corpus: Path) -> dict[int, str]:
    return losses(run_training(2, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "4"]).stdout)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_equals_baseline(stage: int, baseline_dp2: dict[int, str], tmp_path: Path) -> None:
    out = run_training(2, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "4"] + ds_args(tmp_path, stage))
    assert "backend deepspeed" in out.stdout
    assert_losses_close(losses(out.stdout), baseline_dp2)


def test_model_parallel_2_by_data_parallel_2_zero1_equals_baseline(demo_corpus: Path, tmp_path: Path) -> None:
    common = TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "2", "--model-parallel-size", "2"]
    baseline = run_training(4, common)
    deepspeed = run_training(4, common + ds_args(tmp_path, 1))
    assert "model parallel 2, data parallel 2" in deepspeed.stdout
    assert_losses_close(losses(deepspeed.stdout), losses(baseline.stdout))


def _resume_matches(tmp_path: Path, common: list[str]) -> None:
    straight = losses(run_training(2, common + ["--train-iters", "20"]).stdout)
    save = str(tmp_path / "ckpt")
    run_training(2, common + ["--train-iters", "10", "--save", save, "--save-interval", "10"])
    assert (tmp_path / "ckpt" / "iter_0000010" / "mp_rank_00_model_states.pt").is_file()
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    second = run_training(2, common + ["--train-iters", "20", "--load", save, "--save", save])
    assert losses(second.stdout) == {i: straight[i] for i in range(11, 21)}


def test_exact_resume_from_deepspeed_checkpoint_with_dropout(demo_corpus: Path, tmp_path: Path) -> None:
    _resume_matches(tmp_path, TINY_GPT2 + ["--batch-size", "4"] + ds_args(tmp_path, 1))


def test_zero2_cpu_offload_trains_and_resumes(demo_corpus: Path, tmp_path: Path) -> None:
    config = str(REPO / "scripts" / "ds_zero2_offload_config.json")
    _resume_matches(tmp_path, TINY_GPT2 + ["--batch-size", "4", "--deepspeed", "--deepspeed_config", config])


def test_bf16_trains_and_resumes(demo_corpus: Path, tmp_path: Path) -> None:
    common = TINY_GPT2 + ["--batch-size", "4", "--bf16"] + ds_args(tmp_path, 2)
    _resume_matches(tmp_path, common)


def test_batch_size_contradiction_is_a_clear_error(demo_corpus: Path, tmp_path: Path) -> None:
    args = TINY_GPT2 + ITERS + ["--batch-size", "4"] + ds_args(tmp_path, 1, train_batch_size=12)
    out = run_training(2, args, check=False)
    assert out.returncode != 0
    assert "train_batch_size must equal --batch-size x gradient accumulation x data-parallel size" in out.stderr
    # torchrun reports the failed child; no frame of our code may appear (no traceback for user errors).
    assert f'File "{REPO}' not in out.stderr


def test_deepspeed_activation_checkpointing_end_to_end(demo_corpus: Path, tmp_path: Path) -> None:
    common = TINY_GPT2 + NO_DROPOUT + ["--train-iters", "8", "--batch-size", "4", "--model-parallel-size", "2"]
    baseline = run_training(2, common)
    checkpointed = run_training(2, common + ds_args(tmp_path, 1) + [
        "--checkpoint-activations", "--deepspeed-activation-checkpointing", "--partition-activations"])
    assert_losses_close(losses(checkpointed.stdout), losses(baseline.stdout))


def test_compile_under_zero3_equals_eager(demo_corpus: Path, tmp_path: Path) -> None:
    """--compile on the DeepSpeed path: ZeRO 3 partitions the compiled layers' parameters."""
    common = TINY_GPT2 + ["--batch-size", "4", "--train-iters", "4"] + ds_args(tmp_path, 3)
    eager = losses(run_training(2, common).stdout)
    compiled = run_training(2, common + ["--compile"])
    assert "compiling 2 transformer layers with torch.compile" in compiled.stdout
    assert_losses_close(losses(compiled.stdout), eager, rel=1e-5)
