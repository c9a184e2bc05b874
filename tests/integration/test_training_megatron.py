"""The baseline Megatron path end to end: parallel runs equal serial ones, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launchers import NO_DROPOUT, TINY_GPT2, assert_losses_close, losses, run_training

ITERS = ["--train-iters", "20"]


@pytest.fixture(scope="module")
def serial_losses(demo_corpus: Path) -> dict[int, str]:
    return losses(run_training(1, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "4"]).stdout)


def test_model_parallel_2_equals_serial(serial_losses: dict[int, str]) -> None:
    out = run_training(2, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "4", "--model-parallel-size", "2"])
    assert_losses_close(losses(out.stdout), serial_losses)


def test_data_parallel_2_equals_serial_with_double_batch(demo_corpus: Path) -> None:
    serial = run_training(1, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "8"])
    parallel = run_training(2, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "4"])
    assert_losses_close(losses(parallel.stdout), losses(serial.stdout))


def test_gradient_accumulation_equals_larger_batch(serial_losses: dict[int, str]) -> None:
    out = run_training(1, TINY_GPT2 + NO_DROPOUT + ITERS + ["--batch-size", "2", "--gradient-accumulation-steps", "2"])
    assert_losses_close(losses(out.stdout), serial_losses)


@pytest.mark.parametrize("model_parallel_size", [1, 2])
def test_exact_resume_with_dropout(model_parallel_size: int, demo_corpus: Path, tmp_path: Path) -> None:
    """20 straight == 10, then --load and 10 more (raising --train-iters), dropout on."""
    common = TINY_GPT2 + ["--batch-size", "4", "--model-parallel-size", str(model_parallel_size)]
    straight = losses(run_training(model_parallel_size, common + ["--train-iters", "20"]).stdout)
    save = str(tmp_path / "ckpt")
    first = run_training(model_parallel_size, common + ["--train-iters", "10", "--save", save, "--save-interval", "5"])
    assert (tmp_path / "ckpt" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    second = run_training(model_parallel_size, common + ["--train-iters", "20", "--load", save, "--save", save])
    assert losses(first.stdout) == {i: straight[i] for i in range(1, 11)}
    assert losses(second.stdout) == {i: straight[i] for i in range(11, 21)}


def test_checkpoint_loads_with_weights_only(demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    run_training(2, TINY_GPT2 + ["--batch-size", "2", "--train-iters", "3", "--save", str(save),
                                 "--model-parallel-size", "2", "--fp16"])
    for mp_rank in (0, 1):
        path = save / "iter_0000003" / f"mp_rank_{mp_rank:02d}" / "model_optim_rng.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["iteration"] == 3 and state["consumed_samples"] == 6
        assert {"model", "optimizer", "lr_scheduler", "rng_states"} <= state.keys()
        assert {"random_rng_state", "np_rng_state", "torch_rng_state", "rng_tracker_states"} <= state["rng_states"].keys()
        assert "loss_scaler" in str(state["optimizer"].keys()) or "loss_scale" in str(state["optimizer"])


def test_fp16_training_on_cpu_lowers_the_loss(demo_corpus: Path) -> None:
    out = run_training(1, TINY_GPT2 + ["--batch-size", "8", "--train-iters", "30", "--fp16",
                                       "--initial-loss-scale", "65536", "--log-interval", "10"])
    printed = losses(out.stdout)
    assert float(printed[30]) < float(printed[10]) - 0.3, printed
    assert "loss scale 65536.0" in out.stdout or "loss scale 32768.0" in out.stdout


def test_demo_run_learns_and_validates(demo_corpus: Path, tmp_path: Path) -> None:
    out = run_training(1, TINY_GPT2 + ["--batch-size", "8", "--train-iters", "40", "--lr-decay-iters", "40",
                                       "--lr", "3e-3", "--eval-interval", "20",
                                       "--eval-iters", "2", "--log-interval", "10",
                                       "--tensorboard-dir", str(tmp_path / "tb"), "--exp-dir", str(tmp_path / "exp")])
    printed = losses(out.stdout)
    assert float(printed[40]) < float(printed[10]) - 0.5, printed
    assert " validation loss at iteration 20 | lm loss value: " in out.stdout
    assert "lm loss PPL" in out.stdout
    assert {p.name for p in (tmp_path / "exp").iterdir()} >= {"hparams.json", "githash.log", "gitdiff.log"}
    assert any((tmp_path / "tb").iterdir())


def test_compile_equals_eager_with_dropout(demo_corpus: Path) -> None:
    """--compile changes the kernels, not the numbers: model parallel 2 with dropout on."""
    common = TINY_GPT2 + ["--batch-size", "4", "--train-iters", "6", "--model-parallel-size", "2"]
    eager = losses(run_training(2, common).stdout)
    compiled = run_training(2, common + ["--compile"])
    assert "compiling 2 transformer layers with torch.compile" in compiled.stdout
    assert_losses_close(losses(compiled.stdout), eager, rel=1e-5)
