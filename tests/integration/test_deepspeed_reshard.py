"""A DeepSpeed run resumed at another data-parallel size or ZeRO stage continues with its optimizer
state (issue 17, the DeepSpeed-path part): 8 iterations at topology A saving at 4, then
iterations 5-8 resumed at topology B from A's iteration-4 checkpoint, with dropout 0 and the
global batch unchanged, print the straight run's losses within 1e-4 (relative). Real DeepSpeed
on CPU ranks, through its universal checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_helpers import close_after_4, resumed_from_4, train_eight_saving_at_4


def _train(directory: Path, stage: int, ranks: int, micro_batch: int, *extra: str, offload: bool = False,
           bf16: bool = False) -> tuple[dict[int, float], str]:
    """8 iterations (resuming when ``directory`` holds a checkpoint) at ZeRO ``stage`` on ``ranks``
    ranks with ``micro_batch`` samples each; the printed losses."""
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config: dict = {"zero_optimization": zero, **({"bf16": {"enabled": True}} if bf16 else {})}
    if bf16:  # DeepSpeed's AdamW on both sides (its CPU Adam under offload), as scripts/ds_zero2_offload_config.json
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.01}}
    path = directory.parent / f"{directory.name}_ds.json"
    path.write_text(json.dumps(config))
    return train_eight_saving_at_4(directory, ranks, "--batch-size", str(micro_batch), "--deepspeed",
                                   "--deepspeed_config", str(path), *extra)


# (stage, ranks, micro batch, flags) before -> after; the global batch stays 4.
TRANSITIONS = {
    "zero1 dp2 -> zero1 dp1 (accumulation 2)": ((1, 2, 2), (1, 1, 2, "--gradient-accumulation-steps", "2")),
    "zero2 dp2 -> zero3 dp2": ((2, 2, 2), (3, 2, 2)),
    "zero3 dp2 -> zero1 dp1": ((3, 2, 2), (1, 1, 4)),
    "zero1 dp1 -> zero2 dp2": ((1, 1, 4), (2, 2, 2)),
}


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_resume_at_another_data_parallel_size_or_stage(transition: str, demo_corpus: Path, tmp_path: Path) -> None:
    before, after = TRANSITIONS[transition]
    expected, _ = _train(tmp_path / "straight", *before)
    got, stdout = _train(resumed_from_4(tmp_path, tmp_path / "straight"), *after)
    assert set(got) == {5, 6, 7, 8}, stdout[-2000:]
    assert close_after_4(expected, got), (expected, got)
    assert "resharded checkpoint" in stdout and "through DeepSpeed's universal checkpoint (weights, fp32" in stdout
    assert not list((tmp_path / "resumed").glob(".reshard-*"))  # the universal copy is gone
    assert "Extracting ZeRO fragments" not in stdout  # ds_to_universal's own report is not ours to print


def test_bf16_zero2_offload_to_bf16_zero1(demo_corpus: Path, tmp_path: Path) -> None:
    """bf16 ZeRO 2 with CPU optimizer offload on 2 ranks, resumed as bf16 ZeRO 1 on 1 rank."""
    expected, _ = _train(tmp_path / "straight", 2, 2, 2, offload=True, bf16=True)
    got, stdout = _train(resumed_from_4(tmp_path, tmp_path / "straight"), 1, 1, 4, bf16=True)
    assert close_after_4(expected, got), (expected, got)
    assert "ZeRO stage 2, data parallel 2" in stdout and "-> DeepSpeed, ZeRO stage 1, data parallel 1" in stdout


def test_the_check_fails_without_the_optimizer_state(demo_corpus: Path, tmp_path: Path) -> None:
    """The same resume with fresh Adam state (--no-load-optim) misses the tolerance: the test
    above can fail."""
    expected, _ = _train(tmp_path / "straight", 1, 2, 2)
    got, stdout = _train(resumed_from_4(tmp_path, tmp_path / "straight"), 1, 1, 4, "--no-load-optim")
    assert "(weights only (--no-load-optim/--finetune))" in stdout
    assert not close_after_4(expected, got), (expected, got)
