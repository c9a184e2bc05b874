"""A run resumed at another tensor- or pipeline-parallel size, or on the other training path,
continues with its optimizer state (issue 17): 8 iterations at topology A saving at 4, then
iterations 5-8 resumed at topology B from A's iteration-4 checkpoint, with dropout 0 and the
global batch (4) unchanged, print the straight run's losses within 1e-4 (relative). Real
DeepSpeed on CPU ranks, through the universal copy (``megatron.checkpoint.universal``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_helpers import close_after_4, resumed_from_4, train_eight_saving_at_4
from launchers import NO_DROPOUT, TINY_GPT2, run_script


def _deepspeed(tmp: Path, name: str, stage: int) -> list[str]:
    path = tmp / f"{name}_zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


# name -> (ranks, arguments) of each topology; every one has a global batch of 4.
TOPOLOGIES = {
    "megatron mp2": (2, ["--model-parallel-size", "2", "--batch-size", "4"]),
    "megatron mp1": (1, ["--batch-size", "4"]),
    "megatron dp1": (1, ["--batch-size", "4"]),
    "zero3 dp2": (2, ["--batch-size", "2", "zero3"]),
    "zero2 dp2": (2, ["--batch-size", "2", "zero2"]),
    "zero1 dp2": (2, ["--batch-size", "2", "zero1"]),
    "zero1 dp1": (1, ["--batch-size", "4", "zero1"]),
    "zero1 mp2": (2, ["--model-parallel-size", "2", "--batch-size", "4", "zero1"]),
    "megatron bf16 mp2": (2, ["--model-parallel-size", "2", "--batch-size", "4", "--bf16"]),
    "megatron bf16 mp1": (1, ["--batch-size", "4", "--bf16"]),
    "pp2": (2, ["--pipe-parallel-size", "2", "--batch-size", "2", "--gradient-accumulation-steps", "2", "zero1"]),
    "pp2 x mp2": (4, ["--pipe-parallel-size", "2", "--model-parallel-size", "2", "--batch-size", "2",
                      "--gradient-accumulation-steps", "2", "zero1"]),
}


def train(directory: Path, topology: str, *extra: str) -> tuple[dict[int, float], str]:
    """8 iterations at ``topology`` (resuming when ``directory`` holds a checkpoint); the losses."""
    ranks, arguments = TOPOLOGIES[topology]
    args = [a for a in arguments if not a.startswith("zero")]
    for flag in (a for a in arguments if a.startswith("zero")):
        args += _deepspeed(directory.parent, directory.name, int(flag[-1]))
    return train_eight_saving_at_4(directory, ranks, *args, *extra)


TRANSITIONS = [
    ("megatron mp2", "megatron mp1"),
    ("megatron mp1", "megatron mp2"),
    ("zero3 dp2", "megatron dp1"),
    ("megatron mp2", "zero2 dp2"),
    ("pp2", "zero1 dp1"),
    ("pp2 x mp2", "zero1 dp2"),
    # Beyond the list: DeepSpeed slicing the copy for tensor parallelism (the fused
    # query/key/value as three sub-parameters), and the Megatron path's bf16 masters.
    ("megatron mp1", "zero1 mp2"),
    ("megatron bf16 mp2", "megatron bf16 mp1"),
    ("megatron mp2", "pp2"),  # into DeepSpeed's pipeline engine
]


@pytest.mark.parametrize("before,after", TRANSITIONS, ids=[f"{a} -> {b}" for a, b in TRANSITIONS])
def test_resume_at_another_topology(before: str, after: str, demo_corpus: Path, tmp_path: Path) -> None:
    expected, _ = train(tmp_path / "straight", before)
    got, stdout = train(resumed_from_4(tmp_path, tmp_path / "straight"), after)
    assert set(got) == {5, 6, 7, 8}, stdout[-3000:]
    assert close_after_4(expected, got), (expected, got)
    assert "resharded checkpoint" in stdout and "through a universal copy" in stdout, stdout[-3000:]
    assert "(weights, fp32 master weights, Adam moments and step, learning-rate schedule)" in stdout
    assert not list((tmp_path / "resumed").glob(".reshard-*"))  # the universal copy is gone


def test_the_check_fails_without_the_optimizer_state(demo_corpus: Path, tmp_path: Path) -> None:
    """The same Megatron MP 2 -> MP 1 resume with the optimizer dropped misses the tolerance."""
    expected, _ = train(tmp_path / "straight", "megatron mp2")
    got, stdout = train(resumed_from_4(tmp_path, tmp_path / "straight"), "megatron mp1", "--no-load-optim")
    assert set(got) == {5, 6, 7, 8} and "weights only" in stdout
    assert not close_after_4(expected, got), (expected, got)


@pytest.mark.parametrize("stage", [1, 3])
def test_our_zero_reader_equals_deepspeeds_converter(stage: int, demo_corpus: Path, tmp_path: Path) -> None:
    """``read_zero_state`` re-assembles the partitions exactly as DeepSpeed's ``ds_to_universal``."""
    import argparse
    import contextlib
    import io

    import torch
    from deepspeed.checkpoint import ds_to_universal

    from megatron.checkpoint.zero_state import read_zero_state, trusted_load

    save = tmp_path / "ckpt"
    args = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", "2", "--save-interval", "2",
            "--batch-size", "2", "--save", str(save), *_deepspeed(tmp_path, "z", stage)]
    run_script("pretrain_gpt2.py", args, 2)
    directory = save / "iter_0000002"
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(directory), output_folder=str(tmp_path / "universal"), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    ours = read_zero_state(str(directory), 0, trusted_load(str(directory / model_file))["param_shapes"])
    assert len(ours.fp32) == 28
    for name, weight in ours.fp32.items():
        for key, tensor in (("fp32", weight), *ours.moments[name].items()):
            theirs = torch.load(tmp_path / "universal" / "zero" / name / f"{key}.pt", weights_only=False)
            theirs = theirs["param"] if isinstance(theirs, dict) else theirs
            assert torch.equal(tensor.flatten(), theirs.flatten()), (name, key)
