"""Learning-rate schedule: linear warmup, then constant / linear / cosine / exponential decay.

The schedule is Megatron-LM's ``AnnealingLR``, written as one pure function of the iteration
(:func:`annealed_lr`) and a small driver that writes the value into an optimizer's param groups.
Iteration ``i`` is the number of optimizer steps taken so far; the trainer calls
``scheduler.step()`` once after every successful optimizer step.

Schedule, with ``w = warmup_iter``, ``n = num_iters`` (``--lr-decay-iters``) and
``p = (i - w) / (n - w)`` the fraction of the decay phase done (clamped to [0, 1])::

    i <= w (warmup):  lr = start_lr * i / w          (rises from 0; min_lr does not apply)
    i >  w (decay):   lr = max(min_lr, start_lr * f(p))
        constant:     f(p) = 1
        linear:       f(p) = 1 - p
        cosine:       f(p) = (1 + cos(pi * p)) / 2
        exponential:  f(p) = 0.1 ** p                (one decade over the decay phase)

After ``num_iters`` the decay is finished (``p = 1``) and the rate holds there: ``min_lr`` for
linear and cosine, ``max(min_lr, start_lr / 10)`` for exponential, ``start_lr`` for constant.
Like Megatron, ``min_lr`` is a floor on the decayed value, not the end point of an interpolation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron.errors import ConfigError

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")

# Fraction of start_lr left at the end of an exponential decay.
EXPONENTIAL_FINAL_FRACTION = 0.1

# Checkpointed hyperparameters, with the names Megatron's checkpoints use.
_HYPERPARAMETER_KEYS = ("start_lr", "warmup_iter", "end_iter", "decay_style", "min_lr")


def _decay_factor(decay_style: str, progress: float) -> float:
    """f(p) of the module docstring, for ``progress`` p in [0, 1]."""
    if decay_style == "constant":
        return 1.0
    if decay_style == "linear":
        return 1.0 - progress
    if decay_style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return EXPONENTIAL_FINAL_FRACTION**progress


def annealed_lr(
    iteration: int,
    start_lr: float,
    warmup_iter: int,
    num_iters: int,
    decay_style: str,
    min_lr: float = 0.0,
) -> float:
    """Learning rate after ``iteration`` optimizer steps (the schedule of the module docstring).

    Arguments must already be valid (see :func:`validate_schedule`).
    """
    if warmup_iter > 0 and iteration <= warmup_iter:
        return start_lr * max(iteration, 0) / warmup_iter
    decay_iters = num_iters - warmup_iter
    progress = 1.0 if decay_iters <= 0 else min((iteration - warmup_iter) / decay_iters, 1.0)
    return max(min_lr, start_lr * _decay_factor(decay_style, progress))


def annealed_lr_tensor(
    iteration: torch.Tensor,
    start_lr: float,
    warmup_iter: int,
    num_iters: int,
    decay_style: str,
    min_lr: float = 0.0,
) -> torch.Tensor:
    """:func:`annealed_lr` of a 0-dim float64 ``iteration`` tensor, computed where it lives.

    The same float64 arithmetic as the Python version (cosine and exponential may differ in the
    last bit), without reading the iteration on the host.
    """
    if decay_style == "constant":
        decayed = torch.full_like(iteration, start_lr)
    else:
        decay_iters = num_iters - warmup_iter
        if decay_iters <= 0:
            progress = torch.ones_like(iteration)
        else:
            progress = ((iteration - warmup_iter) / decay_iters).clamp(max=1.0)
        if decay_style == "linear":
            factor = 1.0 - progress
        elif decay_style == "cosine":
            factor = 0.5 * (1.0 + torch.cos(math.pi * progress))
        else:
            factor = torch.pow(EXPONENTIAL_FINAL_FRACTION, progress)
        decayed = (start_lr * factor).clamp(min=min_lr)
    if warmup_iter <= 0:
        return decayed
    warming = start_lr * iteration.clamp(min=0) / warmup_iter
    return torch.where(iteration <= warmup_iter, warming, decayed)


def validate_schedule(
    start_lr: float, warmup_iter: int, num_iters: int, decay_style: str, min_lr: float
) -> None:
    """Raise ConfigError, naming the bad value and the fix, for an impossible schedule."""
    if decay_style not in DECAY_STYLES:
        raise ConfigError(
            f"unknown --lr-decay-style {decay_style!r}; choose one of {', '.join(DECAY_STYLES)}"
        )
    if start_lr < 0 or min_lr < 0:
        raise ConfigError(f"--lr ({start_lr}) and --min-lr ({min_lr}) must be non-negative")
    if min_lr > start_lr:
        raise ConfigError(f"--min-lr ({min_lr}) must not exceed --lr ({start_lr})")
    if warmup_iter < 0:
        raise ConfigError(f"warmup iterations ({warmup_iter}) must be non-negative; lower --warmup")
    if num_iters < warmup_iter:
        raise ConfigError(
            f"--lr-decay-iters ({num_iters}) is shorter than the warmup ({warmup_iter} iterations); "
            "raise --lr-decay-iters or lower --warmup"
        )


class AnnealingLR:
    """Drives ``optimizer.param_groups[*]['lr']`` along :func:`annealed_lr`.

    ``optimizer`` is anything with a ``param_groups`` list of dicts: a torch optimizer,
    :class:`megatron.fp16.FP16_Optimizer`, or a DeepSpeed engine's optimizer. Construction sets
    the rate for iteration ``last_iter + 1`` (0 for a fresh run, as in Megatron, so the first
    step runs at lr 0 when there is a warmup).

    Checkpoint semantics (Megatron's flags): :meth:`load_state_dict` always restores the
    iteration. The hyperparameters (start_lr, warmup_iter, num_iters, decay_style, min_lr) come
    from the constructor when ``override_lr_scheduler`` (``--override-lr-scheduler``), from the
    checkpoint when ``use_checkpoint_lr_scheduler`` (``--use-checkpoint-lr-scheduler``, the
    default), and otherwise must match the checkpoint (ConfigError if not).

    Device mode (``lr_tensor``, a 0-dim tensor on the training device): the iteration is kept
    in a float64 tensor beside it and every group's ``lr`` *is* ``lr_tensor``, refilled on the
    device at each step, so that :meth:`step_applied` can advance the schedule by a step that
    may have been skipped without the host reading whether it was (the optimizer must take a
    tensor lr: torch's fused Adam/AdamW). Reading :attr:`num_iters` or :meth:`get_lr` then
    synchronises; the trainer does it only to log and to checkpoint.
    """

    def __init__(
        self,
        optimizer: Any,
        start_lr: float,
        warmup_iter: int,
        num_iters: int,
        decay_style: str,
        last_iter: int = -1,
        min_lr: float = 0.0,
        *,
        override_lr_scheduler: bool = False,
        use_checkpoint_lr_scheduler: bool = True,
        lr_tensor: torch.Tensor | None = None,
    ) -> None:
        if override_lr_scheduler and use_checkpoint_lr_scheduler:
            raise ConfigError(
                "--override-lr-scheduler and --use-checkpoint-lr-scheduler contradict each "
                "other; pass use_checkpoint_lr_scheduler=False to override"
            )
        decay_style = decay_style.lower()
        validate_schedule(start_lr, warmup_iter, num_iters, decay_style, min_lr)
        self.optimizer = optimizer
        self.start_lr = float(start_lr)
        self.warmup_iter = int(warmup_iter)
        self.end_iter = int(num_iters)
        self.decay_style = decay_style
        self.min_lr = float(min_lr)
        self.override_lr_scheduler = override_lr_scheduler
        self.use_checkpoint_lr_scheduler = use_checkpoint_lr_scheduler
        self.lr_tensor = lr_tensor
        self._iteration: int | torch.Tensor = 0
        if lr_tensor is not None:
            self._iteration = torch.zeros((), dtype=torch.float64, device=lr_tensor.device)
        self.step(last_iter + 1)

    @property
    def num_iters(self) -> int:
        """The current iteration (Megatron's name, kept for checkpoints); reads the device in device mode."""
        return int(self._iteration.item()) if isinstance(self._iteration, torch.Tensor) else self._iteration

    def get_lr(self) -> float:
        """Learning rate for the current iteration."""
        return annealed_lr(
            self.num_iters, self.start_lr, self.warmup_iter, self.end_iter, self.decay_style,
            self.min_lr,
        )

    def step(self, step_num: int | None = None) -> None:
        """Advance to iteration ``step_num`` (default: the next one) and set every group's lr."""
        if isinstance(self._iteration, torch.Tensor):
            if step_num is None:
                self._iteration += 1
            else:
                self._iteration.fill_(int(step_num))
        else:
            self._iteration = self._iteration + 1 if step_num is None else int(step_num)
        self._write_lr()

    def step_applied(self, applied: torch.Tensor) -> None:
        """Advance by ``applied`` (0-dim, 1 when the optimizer step was applied, 0 when skipped).

        In device mode nothing is read on the host; otherwise this reads ``applied``.
        """
        if isinstance(self._iteration, torch.Tensor):
            self._iteration += applied.to(self._iteration)
            self._write_lr()
        elif bool(applied):
            self.step()

    def _write_lr(self) -> None:
        if self.lr_tensor is None:
            lr: float | torch.Tensor = self.get_lr()
        else:
            self.lr_tensor.copy_(annealed_lr_tensor(self._iteration, self.start_lr, self.warmup_iter,
                                                    self.end_iter, self.decay_style, self.min_lr))
            lr = self.lr_tensor
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads under ``torch.load(weights_only=True)``)."""
        return {
            "start_lr": self.start_lr,
            "warmup_iter": self.warmup_iter,
            "num_iters": self.num_iters,
            "decay_style": self.decay_style,
            "end_iter": self.end_iter,
            "min_lr": self.min_lr,
        }

    def _resolve(self, name: str, checkpoint_value: Any) -> Any:
        """The value of hyperparameter ``name`` after loading, per the class docstring."""
        own_value = getattr(self, name)
        if self.override_lr_scheduler:
            return own_value
        if not self.use_checkpoint_lr_scheduler and own_value != checkpoint_value:
            raise ConfigError(
                f"lr scheduler {name}: the arguments give {own_value!r} but the checkpoint has "
                f"{checkpoint_value!r}; pass --override-lr-scheduler to use the arguments or "
                "--use-checkpoint-lr-scheduler to use the checkpoint"
            )
        return checkpoint_value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the iteration and (see the class docstring) the hyperparameters."""
        resolved = {name: self._resolve(name, state_dict[name]) for name in _HYPERPARAMETER_KEYS}
        validate_schedule(
            resolved["start_lr"], resolved["warmup_iter"], resolved["end_iter"],
            resolved["decay_style"], resolved["min_lr"],
        )
        for name, value in resolved.items():
            setattr(self, name, value)
        self.step(int(state_dict["num_iters"]))
