"""Findings of a hostile review of the DeepSpeed resharding load (issue 17), kept as tests: each
reproduces what failed when it was found.

1. ZeRO 1 -> ZeRO 0 through the reshard path was an AttributeError traceback (exit 1); ZeRO 0
   does not partition the optimizer and DeepSpeed converts only partitioned checkpoints, so
   both directions are now refused in one line saying which stage to launch at.
2. ZeRO 1 -> ZeRO 3 with --no-load-optim/--finetune is a ValueError traceback ("Unable to find
   'latest' file at <save>/.reshard-<pid>/latest", exit 1).
3. A ZeRO 0 source resumed at ZeRO 1 failed in the converter ("can't find *_optim_states.pt").
4. --finetune / --no-load-optim through the reshard path take the first step at the checkpoint's
   last learning rate (8e-4 here) and hyper-parameters instead of the new run's (--lr 1e-4):
   DeepSpeed's universal load copies the saved param_groups even without the optimizer.
5. A full disk under --save during the conversion was reported as a user mistake (exit 2) with
   torch's "[enforce fail at inline_container.cc:672] . unexpected pos ..." and no word of space.
6. A changed global batch on resume ran out of samples mid-run (StopIteration traceback).
7. Without --save on 2 ranks, rank 1 called the checkpoint corrupt (a broken broadcast).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import tree_digest
from launchers import NO_DROPOUT, TINY_GPT2, assert_one_line_error, losses, run_script


def _train(directory: Path, stage: int, ranks: int, micro_batch: int, iters: int, *extra: str,
           check: bool = True) -> subprocess.CompletedProcess:
    config = directory.parent / f"{directory.name}_z{stage}.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    args = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", str(iters), "--lr-decay-iters", "20",
            "--save-interval", "4", "--batch-size", str(micro_batch), "--save", str(directory), "--deepspeed",
            "--deepspeed_config", str(config), *extra]
    return run_script("pretrain_gpt2.py", args, ranks if ranks > 1 else None, timeout=600, check=check)


@pytest.fixture(scope="module")
def zero1_dp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("reshard_findings") / "z1dp1"
    _train(source, 1, 1, 4, 4)
    return source


def test_zero1_to_zero0_is_refused(zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    before = tree_digest(zero1_dp1)
    result = _train(tmp_path / "out", 0, 1, 4, 6, "--load", str(zero1_dp1), check=False)
    assert_one_line_error(result, "ZeRO stage 1, data parallel 1", "ZeRO stage 0, data parallel 1",
                          "launch at ZeRO stage 1, 2 or 3")
    assert tree_digest(zero1_dp1) == before


@pytest.mark.parametrize("flag", ["--no-load-optim", "--finetune"])
def test_zero1_to_zero3_without_the_optimizer(flag: str, zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    result = _train(tmp_path / "out", 3, 1, 4, 6, "--load", str(zero1_dp1), flag, check=False)
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.returncode == 0, result.stderr[-1500:]


def test_zero0_source_resumes_at_zero1(demo_corpus: Path, tmp_path: Path) -> None:
    """Refused before the universal copy existed (DeepSpeed converts only partitioned optimizers)."""
    source = tmp_path / "z0"
    _train(source, 0, 1, 4, 4)
    before = tree_digest(source)
    result = _train(tmp_path / "out", 1, 1, 4, 6, "--load", str(source), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DeepSpeed, ZeRO stage 0, data parallel 1, model parallel 1, pipeline 1 -> DeepSpeed, ZeRO stage 1" \
        in result.stdout and "through a universal copy" in result.stdout
    assert tree_digest(source) == before


def test_a_changed_global_batch_continues_at_the_consumed_samples(zero1_dp1: Path, demo_corpus: Path,
                                                                  tmp_path: Path) -> None:
    """Refused before (the data set was sized for the new batch only: 6 x 2 = 12 samples, fewer than
    the 16 already consumed); now allowed with a start-up note, the sample counter carried on."""
    out = tmp_path / "out"
    result = _train(out, 1, 1, 2, 6, "--load", str(zero1_dp1))
    assert "note: the checkpoint consumed 16 samples in 4 iterations (global batch 4); this run's global batch " \
           "is 2 (--batch-size 2 x data parallel 1): the data continues at sample 16" in result.stdout
    assert set(losses(result.stdout)) == {5, 6}
    client = torch.load(out / "iter_0000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert (client["iteration"], client["consumed_samples"]) == (6, 20)


def test_no_save_on_two_ranks_is_one_reason(zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    config = tmp_path / "z1.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    args = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", "6", "--lr-decay-iters", "20",
            "--batch-size", "2", "--load", str(zero1_dp1), "--deepspeed", "--deepspeed_config", str(config)]
    result = run_script("pretrain_gpt2.py", args, 2, timeout=600, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode != 0 and errors and all("pass --save" in line for line in errors), errors


def test_finetune_takes_the_new_learning_rate(demo_corpus: Path, tmp_path: Path) -> None:
    """--finetune --lr 1e-4 from a ZeRO 1 DP 2 checkpoint: at DP 2 (no reshard) and at DP 1 (the
    reshard path) the same data and weights give the same losses, unless the first step used
    another learning rate."""
    source = tmp_path / "z1dp2"
    _train(source, 1, 2, 2, 4)
    direct = _train(tmp_path / "direct", 1, 2, 2, 3, "--load", str(source), "--finetune", "--lr", "1e-4")
    resharded = _train(tmp_path / "resharded", 1, 1, 4, 3, "--load", str(source), "--finetune", "--lr", "1e-4")
    assert "resharded checkpoint" in resharded.stdout
    a, b = losses(direct.stdout), losses(resharded.stdout)
    assert abs(float(a[2]) - float(b[2])) <= 1e-5 * abs(float(a[2])), (a, b)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root for a tmpfs")
def test_full_disk_during_conversion_is_a_fault(zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(full)], check=True)
    try:
        before = tree_digest(zero1_dp1)
        result = _train(full, 3, 1, 4, 6, "--load", str(zero1_dp1), check=False)
        assert result.returncode == 1, (result.returncode, result.stderr[-1500:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "space" in errors[0].lower(), errors
        assert not list(full.glob(".reshard-*"))
        assert tree_digest(zero1_dp1) == before
    finally:
        subprocess.run(["umount", str(full)], check=False)


@pytest.mark.parametrize("route", ["deepspeed universal", "universal copy"])
def test_a_changed_model_shape_is_named_before_any_conversion(route: str, zero1_dp1: Path, demo_corpus: Path,
                                                               tmp_path: Path) -> None:
    """Another hidden size at another topology: one line naming both shapes, from the checkpoint's
    description (not DeepSpeed's loader failing on a tensor), and nothing written."""
    out = tmp_path / "out"
    if route == "deepspeed universal":  # two ranks under torchrun: each rank's one line, torchrun's exit 1
        result = _train(out, 1, 2, 2, 6, "--load", str(zero1_dp1), "--hidden-size", "32", check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert result.returncode != 0 and errors and all("hidden_size: checkpoint 64 vs run 32" in line
                                                         for line in errors), result.stderr[-2000:]
    else:
        result = run_script("pretrain_gpt2.py", [*TINY_GPT2, "--train-iters", "6", "--save", str(out), "--load",
                                                 str(zero1_dp1), "--hidden-size", "32"], None, check=False)
        assert_one_line_error(result, "hidden_size: checkpoint 64 vs run 32")
    assert not list(out.glob(".reshard-*")) and not list(out.glob("iter_*"))



def _megatron(directory: Path, iters: int, *extra: str) -> subprocess.CompletedProcess:
    args = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", str(iters), "--save-interval", "4",
            "--batch-size", "4", "--save", str(directory), *extra]
    return run_script("pretrain_gpt2.py", args, None, timeout=600)


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A Megatron-path checkpoint saved with --no-save-optim at iteration 4, and the loss of
    iteration 5 when the Megatron path resumes it with --no-load-optim."""
    source = tmp_path_factory.mktemp("weights_only") / "nso"
    _megatron(source, 4, "--no-save-optim")
    copy = source.parent / "same_path"
    shutil.copytree(source, copy)
    out = _megatron(copy, 5, "--load", str(copy), "--no-load-optim")
    return source, float(losses(out.stdout)[5])


@pytest.mark.parametrize("stage", [1, 3])
def test_a_weights_only_checkpoint_on_deepspeed_continues_from_its_weights(
        stage: int, weights_only: tuple[Path, float], demo_corpus: Path, tmp_path: Path) -> None:
    """DeepSpeed's universal load zips its parameter groups with the copy's: a copy without
    optimizer state had none, so ZeRO 1/2 loaded no weights and trained on from random ones
    (exit 0), and ZeRO 3 looked for Adam moments that were not there."""
    source, expected = weights_only
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    out = _train(resumed, stage, 1, 4, 5, "--load", str(resumed), "--no-load-optim")
    got = float(losses(out.stdout)[5])
    assert abs(got - expected) <= 1e-4 * abs(expected), (got, expected)


def test_a_bert_checkpoint_at_another_topology_is_refused(demo_corpus: Path, tmp_path: Path) -> None:
    """The universal copy knows GPT-2's parameters only: a BERT one corrupted the heap."""
    from launchers import DEMO_DIR

    bert = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--lr", "1e-3", "--lr-decay-iters", "20", "--log-interval", "1",
            "--eval-iters", "0", "--num-workers", "0", "--train-data", "demo", "--demo-data-dir", str(DEMO_DIR),
            "--vocab-file", str(DEMO_DIR / "bert-uncased-vocab.txt"), "--make-vocab-size-divisible-by", "40"]
    save = tmp_path / "bert"
    run_script("pretrain_bert.py", [*bert, "--batch-size", "4", "--train-iters", "2", "--save-interval", "2",
                                    "--save", str(save), "--model-parallel-size", "2"], 2)
    before = tree_digest(save)
    result = run_script("pretrain_bert.py", [*bert, "--batch-size", "4", "--train-iters", "4", "--save", str(save),
                                             "--load", str(save)], None, check=False)
    assert_one_line_error(result, "is not a GPT-2 checkpoint", "resume it at its saved topology")
    assert tree_digest(save) == before


def test_a_megatron_save_removes_deepspeeds_stale_latest(zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    """DeepSpeed's tools follow ``latest``; after a Megatron-path checkpoint it named an older one."""
    resumed = tmp_path / "resumed"
    shutil.copytree(zero1_dp1, resumed)
    out = _megatron(resumed, 5, "--load", str(resumed))
    assert "removed" in out.stdout and not (resumed / "latest").exists()
    assert (resumed / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_nothing_to_train_is_said(zero1_dp1: Path, demo_corpus: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(zero1_dp1, resumed)
    out = _megatron(resumed, 4, "--load", str(resumed))
    assert "note: the checkpoint is at iteration 4 and --train-iters is 4: nothing to train" in out.stdout
