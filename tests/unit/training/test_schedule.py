"""AnnealingLR against the closed-form schedule, and its checkpoint semantics."""

from __future__ import annotations

import io
import math

import pytest
import torch

from megatron.training.schedule import DECAY_STYLES, AnnealingLR

START_LR = 1e-3
WARMUP = 10
END = 110  # --lr-decay-iters


def _optimizer(num_groups: int = 2) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(num_groups)]
    return torch.optim.SGD(groups, lr=123.0)


def _scheduler(decay_style: str, min_lr: float = 0.0, **kwargs) -> AnnealingLR:
    return AnnealingLR(_optimizer(), START_LR, WARMUP, END, decay_style, min_lr=min_lr, **kwargs)


def _lr_at(scheduler: AnnealingLR, iteration: int) -> float:
    scheduler.step(iteration)
    lrs = {group["lr"] for group in scheduler.optimizer.param_groups}
    assert lrs == {scheduler.get_lr()}
    return scheduler.get_lr()


@pytest.mark.parametrize("decay_style", DECAY_STYLES)
def test_warmup_is_linear_from_zero(decay_style: str) -> None:
    scheduler = _scheduler(decay_style)
    assert scheduler.optimizer.param_groups[0]["lr"] == 0.0  # set at construction
    for iteration in (0, 1, 5, WARMUP):
        assert _lr_at(scheduler, iteration) == pytest.approx(START_LR * iteration / WARMUP)


@pytest.mark.parametrize("iteration", [10, 35, 60, 85, 110, 500])
def test_decay_styles_match_closed_form(iteration: int) -> None:
    progress = min((iteration - WARMUP) / (END - WARMUP), 1.0)
    expected = {
        "constant": START_LR,
        "linear": START_LR * (1 - progress),
        "cosine": START_LR * 0.5 * (1 + math.cos(math.pi * progress)),
        "exponential": START_LR * 0.1**progress,
    }
    for decay_style, lr in expected.items():
        assert _lr_at(_scheduler(decay_style), iteration) == pytest.approx(lr, abs=1e-15)


def test_known_points() -> None:
    assert _lr_at(_scheduler("linear"), 60) == pytest.approx(START_LR / 2)
    assert _lr_at(_scheduler("cosine"), 60) == pytest.approx(START_LR / 2)
    assert _lr_at(_scheduler("exponential"), 110) == pytest.approx(START_LR / 10)


@pytest.mark.parametrize("decay_style", ["linear", "cosine", "exponential"])
def test_min_lr_floors_decay_and_holds_after_end(decay_style: str) -> None:
    min_lr = 2e-4
    scheduler = _scheduler(decay_style, min_lr=min_lr)
    lrs = [_lr_at(scheduler, iteration) for iteration in range(WARMUP + 1, END + 50)]
    assert min(lrs) == pytest.approx(min_lr)
    assert all(lr >= min_lr for lr in lrs)
    assert lrs[-1] == lrs[END - WARMUP - 1] == pytest.approx(max(min_lr, {
        "linear": 0.0, "cosine": 0.0, "exponential": START_LR / 10}[decay_style]))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warmup


def test_no_warmup_starts_at_start_lr() -> None:
    scheduler = AnnealingLR(_optimizer(), START_LR, 0, 100, "linear")
    assert scheduler.get_lr() == START_LR
    assert _lr_at(scheduler, 50) == pytest.approx(START_LR / 2)


def test_step_advances_by_one_and_last_iter_resumes() -> None:
    scheduler = _scheduler("cosine")
    for _ in range(42):
        scheduler.step()
    assert scheduler.num_iters == 42
    resumed = _scheduler("cosine", last_iter=41)
    assert resumed.num_iters == 42 and resumed.get_lr() == scheduler.get_lr()


def test_invalid_arguments_raise_with_choices() -> None:
    with pytest.raises(ValueError, match="constant, linear, cosine, exponential"):
        _scheduler("step")
    with pytest.raises(ValueError, match="--min-lr"):
        _scheduler("linear", min_lr=1.0)
    with pytest.raises(ValueError, match="--lr-decay-iters"):
        AnnealingLR(_optimizer(), START_LR, 20, 10, "linear")
    with pytest.raises(ValueError, match="contradict"):
        _scheduler("linear", override_lr_scheduler=True)


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("decay_style", DECAY_STYLES)
def test_resume_from_state_dict_continues_exactly(decay_style: str) -> None:
    reference = _scheduler(decay_style, min_lr=1e-5)
    for _ in range(37):
        reference.step()
    state = _round_trip(reference.state_dict())
    resumed = AnnealingLR(_optimizer(3), 1.0, 0, 1, "constant", use_checkpoint_lr_scheduler=True)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == reference.state_dict()
    for _ in range(100):
        reference.step()
        resumed.step()
        assert resumed.optimizer.param_groups[2]["lr"] == reference.get_lr()


def test_override_keeps_arguments_and_strict_mode_rejects_mismatch() -> None:
    state = _scheduler("linear").state_dict() | {"num_iters": 60}
    overriding = AnnealingLR(_optimizer(), 5e-4, 0, 200, "cosine", override_lr_scheduler=True,
                             use_checkpoint_lr_scheduler=False)
    overriding.load_state_dict(state)
    assert overriding.num_iters == 60 and overriding.decay_style == "cosine"
    assert overriding.get_lr() == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    strict = AnnealingLR(_optimizer(), 5e-4, 0, 200, "cosine", use_checkpoint_lr_scheduler=False)
    with pytest.raises(ValueError, match="--override-lr-scheduler"):
        strict.load_state_dict(state)
    matching = _scheduler("linear", use_checkpoint_lr_scheduler=False)
    matching.load_state_dict(state)
    assert matching.get_lr() == pytest.approx(START_LR / 2)


def test_drives_any_object_with_param_groups() -> None:
    class Holder:
        param_groups = [{"lr": None}, {"lr": None}]

    scheduler = AnnealingLR(Holder(), START_LR, 0, 10, "constant")
    assert [group["lr"] for group in Holder.param_groups] == [START_LR, START_LR]
    assert scheduler.get_lr() == START_LR
