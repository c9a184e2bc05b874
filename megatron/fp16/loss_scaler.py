"""Loss scaling for half-precision training: a static scale and Megatron's dynamic scale.

The loss is multiplied by the scale before ``backward`` so that small fp16 gradients do not
flush to zero; the optimizer divides the gradients by the same scale before stepping. A step whose
gradients hold inf or nan is skipped (see :class:`megatron.fp16.FP16_Optimizer`).

Unlike ``torch.amp.GradScaler`` the dynamic scaler has Megatron's hysteresis (``delayed_shift``)
and a floor (``min_scale``), and its overflow check agrees across the model-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu


def local_has_overflow(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-dim float tensor, 1.0 when some ``param.grad`` here holds inf or nan, else 0.0.

    The tensor lives on the device of the gradients; building it forces no host sync.
    """
    grads = [p.grad.detach() for p in params if p.grad is not None and p.grad.numel() > 0]
    if not grads:
        return torch.zeros(())
    # min and max propagate nan and are infinite when an element is: finite both exactly when the
    # tensor holds neither. (aminmax is one vectorised pass; an inf-norm is 15x slower on CPU.)
    extremes = [torch.stack(torch.aminmax(grad)).float() for grad in grads]
    return (~torch.cat(extremes).isfinite()).any().float()


def overflow_flag(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-dim float tensor: 1.0 when any rank of this model-parallel group has an inf/nan gradient
    in ``params``; nothing is read on the host.

    When torch.distributed and the model-parallel groups are initialized, every rank of the
    model-parallel group must call it: the flag is all-reduced (MAX) over that group, so that all
    ranks holding pieces of one model skip the same step. Data-parallel ranks see all-reduced
    gradients already and agree without communicating.
    """
    flag = local_has_overflow(params)
    if dist.is_initialized() and mpu.model_parallel_is_initialized():
        if mpu.get_model_parallel_world_size() > 1:
            flag = flag.to(mpu.communication_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mpu.get_model_parallel_group())
    return flag


def has_overflow(params: Iterable[torch.Tensor]) -> bool:
    """:func:`overflow_flag` read on the host (a collective over the model-parallel group)."""
    return bool(overflow_flag(params).item())


class LossScaler:
    """A constant loss scale (``--loss-scale``; 1.0 for bf16).

    Overflow is still detected (a static scale can overflow too) and the step skipped by the
    optimizer, but the scale never changes. The scale lives in a 0-dim fp32 tensor
    (:attr:`scale_tensor`, moved with :meth:`to`) so that scaling and, for the dynamic scaler,
    updating it need no host synchronisation; :attr:`loss_scale` reads it on the host.
    """

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"loss scale ({scale}) must be positive; pass e.g. --loss-scale 1024")
        self.scale_tensor = torch.tensor(float(scale))

    def to(self, device: torch.device | str) -> LossScaler:
        """Keep the scale (and counters) on ``device``, the device of the gradients."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @property
    def loss_scale(self) -> float:
        return float(self.scale_tensor.item())

    @property
    def cur_scale(self) -> float:
        """Megatron's name for :attr:`loss_scale`."""
        return self.loss_scale

    def has_overflow(self, params: Iterable[torch.Tensor]) -> bool:
        """See :func:`has_overflow` (a collective over the model-parallel group)."""
        return has_overflow(params)

    def update_scale(self, overflow: bool | torch.Tensor) -> None:
        """A static scale ignores overflows."""

    def scale_gradient(
        self, module: torch.nn.Module, grad_in: tuple[torch.Tensor | None, ...], grad_out: Any
    ) -> tuple[torch.Tensor | None, ...]:
        """Backward hook (Megatron's signature) multiplying the incoming gradients by the scale."""
        return tuple(None if grad is None else grad * self.scale_tensor.to(grad) for grad in grad_in)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """``(loss * scale).backward()``; the product is taken in fp32."""
        (loss.float() * self.scale_tensor.to(loss.device)).backward(retain_graph=retain_graph)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only."""
        return {"loss_scale": self.loss_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A static scale is configuration, not state: the constructor's value is kept."""


class DynamicLossScaler(LossScaler):
    """Megatron's dynamic loss scale.

    On an overflow the window of good steps restarts and the hysteresis counter (initially
    ``delayed_shift``) is decremented; once it reaches zero, this and every further overflow
    divides the scale by ``scale_factor``, never below ``min_scale``. After ``scale_window``
    consecutive steps without overflow the scale is multiplied by ``scale_factor`` and the
    hysteresis counter is reset to ``delayed_shift``. With ``delayed_shift=1`` every overflow
    lowers the scale.
    """

    def __init__(
        self,
        init_scale: float = 2.0**32,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        delayed_shift: int = 1,
    ) -> None:
        _validate_dynamic(init_scale, scale_factor, scale_window, min_scale, delayed_shift)
        super().__init__(init_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        # Counters as 0-dim tensors beside the scale, so that updating needs no host read.
        self.good_steps_tensor = torch.tensor(0)  # consecutive steps without overflow
        self.hysteresis_tensor = torch.tensor(self.delayed_shift)

    @property
    def good_steps(self) -> int:
        return int(self.good_steps_tensor.item())

    @property
    def hysteresis_left(self) -> int:
        return int(self.hysteresis_tensor.item())

    def update_scale(self, overflow: bool | torch.Tensor) -> None:
        """Account for one step; ``overflow`` (a bool, or a 0-dim tensor read on the device)
        must agree across the model-parallel group.

        On overflow: restart the window, spend one unit of hysteresis, and once it is spent
        divide the scale (floor ``min_scale``). Otherwise count a good step; a full window
        multiplies the scale and refills the hysteresis.
        """
        overflow = torch.as_tensor(overflow, device=self.scale_tensor.device).bool()
        good = torch.where(overflow, 0, self.good_steps_tensor + 1)
        hysteresis = self.hysteresis_tensor - overflow.long()
        lowered = (self.scale_tensor / self.scale_factor).clamp(min=self.min_scale)
        scale = torch.where(overflow & (hysteresis <= 0), lowered, self.scale_tensor)
        grow = good == self.scale_window
        self.scale_tensor = torch.where(grow, scale * self.scale_factor, scale)
        self.good_steps_tensor = torch.where(grow, 0, good)
        self.hysteresis_tensor = torch.where(grow, self.delayed_shift, hysteresis)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only: the scale and both counters."""
        return {
            "loss_scale": self.loss_scale,
            "good_steps": self.good_steps,
            "hysteresis_left": self.hysteresis_left,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scale and counters; the hyperparameters stay the constructor's.

        A static scaler's state (``loss_scale`` only) is accepted and starts a fresh window.
        """
        device = self.scale_tensor.device
        self.scale_tensor = torch.tensor(float(state_dict["loss_scale"]), device=device)
        self.good_steps_tensor = torch.tensor(int(state_dict.get("good_steps", 0)), device=device)
        self.hysteresis_tensor = torch.tensor(int(state_dict.get("hysteresis_left", self.delayed_shift)),
                                              device=device)


def _validate_dynamic(
    init_scale: float, scale_factor: float, scale_window: int, min_scale: float, delayed_shift: int
) -> None:
    if not scale_factor > 1:
        raise ValueError(f"loss scale factor ({scale_factor}) must exceed 1, e.g. 2.0")
    if scale_window < 1:
        raise ValueError(f"--loss-scale-window ({scale_window}) must be at least 1, e.g. 1000")
    if not 0 < min_scale <= init_scale:
        raise ValueError(
            f"--min-scale ({min_scale}) must be positive and at most the initial scale "
            f"({init_scale})"
        )
    if delayed_shift < 1:
        raise ValueError(f"--hysteresis ({delayed_shift}) must be at least 1, e.g. 2")
