"""Half-precision training without apex: a casting module wrapper and an fp32-master optimizer.

``FP16_Module`` runs the model in fp16 (``--fp16``) or bf16 (``--bf16``) behind an fp32
interface. ``FP16_Optimizer`` keeps an fp32 master copy of every half parameter, steps the wrapped
torch optimizer on the masters, and copies the result back into the half model. The bf16 path uses
the same wrapper with a static loss scale of 1.0: bf16 has fp32's exponent range, so gradients do
not underflow and need no scaling, but the fp32 masters are still what keeps small updates from
being rounded away.

Typical use (Megatron's order)::

    model = FP16_Module(model)                       # or FP16_Module(model, dtype=torch.bfloat16)
    optimizer = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                               dynamic_loss_scale=True)
    optimizer.zero_grad()
    optimizer.backward(loss)                         # scales, backprops, fills master grads
    optimizer.clip_master_grads(1.0)
    if optimizer.step():                             # False: overflow, step skipped
        lr_scheduler.step()
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from megatron import mpu

from .loss_scaler import DynamicLossScaler, LossScaler, overflow_flag

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Tags (see megatron.mpu.layers.mark_model_parallel) a master copy inherits from its model param,
# so that model-parallel norms count it as the model param would be counted.
_PARALLEL_ATTRIBUTES = ("model_parallel", "tensor_model_parallel", "partition_dim", "partition_stride")


def _cast_floats(value: Any, source: torch.dtype, target: torch.dtype) -> Any:
    """``value`` with every ``source``-dtype tensor inside (tuples, lists, dicts) cast to ``target``."""
    if isinstance(value, torch.Tensor):
        return value.to(target) if value.dtype == source else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_cast_floats(item, source, target) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(item, source, target) for item in value)
    if isinstance(value, dict):
        return {key: _cast_floats(item, source, target) for key, item in value.items()}
    return value


def _check_half_dtype(dtype: torch.dtype) -> None:
    if dtype not in HALF_DTYPES:
        raise ValueError(f"half dtype must be torch.float16 or torch.bfloat16, got {dtype}")


class FP16_Module(nn.Module):
    """Runs ``module`` in ``dtype`` (fp16 or bf16) behind an fp32 interface.

    The module's floating parameters and buffers are cast to ``dtype`` in place. ``forward``
    casts fp32 tensors among the inputs (positional and keyword, inside tuples/lists/dicts too) to
    ``dtype`` and ``dtype`` tensors among the outputs back to fp32; integer tensors pass through.
    ``state_dict``/``load_state_dict`` are the wrapped module's (no ``module.`` prefix), as in
    Megatron, so checkpoints load into the unwrapped model too.

    ``cast_outputs=False`` returns the outputs in ``dtype``: for a loss that reads half logits
    itself in fp32 (``mpu.vocab_parallel_cross_entropy``), which then costs no fp32 copy of the
    logits (the largest activation of GPT-2) and no cast of their gradient back.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.half, cast_outputs: bool = True) -> None:
        _check_half_dtype(dtype)
        super().__init__()
        self.dtype = dtype
        self.cast_outputs = cast_outputs
        self.module = module.to(dtype)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs = _cast_floats(inputs, torch.float32, self.dtype)
        kwargs = _cast_floats(kwargs, torch.float32, self.dtype)
        outputs = self.module(*inputs, **kwargs)
        return _cast_floats(outputs, self.dtype, torch.float32) if self.cast_outputs else outputs

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def _make_master(param: torch.Tensor) -> nn.Parameter:
    """An fp32 copy of ``param`` carrying its model-parallel tags."""
    master = nn.Parameter(param.detach().to(torch.float32, copy=True))
    for name in _PARALLEL_ATTRIBUTES:
        if hasattr(param, name):
            setattr(master, name, getattr(param, name))
    return master


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` tensor attribute (skips on 1.0 without
    a host read): torch's fused Adam, AdamW and SGD, the optimizers ``GradScaler`` drives that way."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step ``optimizer`` unless the 0-dim float ``found_inf`` is 1.0, decided on the device.

    A skipped step leaves parameters and optimizer state (step counts included) untouched.
    """
    optimizer.found_inf = found_inf.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def _build_scaler(
    static_loss_scale: float, dynamic_loss_scale: bool, dynamic_loss_args: dict[str, Any] | None
) -> LossScaler:
    if not dynamic_loss_scale:
        return LossScaler(static_loss_scale)
    try:
        return DynamicLossScaler(**(dynamic_loss_args or {}))
    except TypeError as error:
        raise ValueError(
            f"bad dynamic_loss_args {dynamic_loss_args}: {error}; allowed keys are init_scale, "
            "scale_factor, scale_window, min_scale, delayed_shift"
        ) from error


class FP16_Optimizer:
    """Mixed-precision wrapper: fp32 master weights, loss scaling, overflow skipping.

    ``init_optimizer`` (e.g. ``torch.optim.AdamW``) must have been built over the half model's
    parameters. Each fp16/bf16 parameter in its param groups is replaced, in place, by an fp32
    master copy (any per-parameter state moves along); fp32 parameters are optimized directly.
    The same optimizer object is kept rather than rebuilt with ``type(opt)(param_groups)``, so
    constructor-only options (e.g. ``fused``, DeepSpeed FusedAdam's ``adam_w_mode``) survive and
    the param groups keep all their hyperparameters.

    Every rank of a model-parallel group must make the same calls: overflow detection and
    gradient clipping communicate over the model-parallel group once it is initialized.

    Attributes: ``overflow`` (the last :meth:`update_master_grads` found inf/nan),
    ``skipped_steps`` (steps skipped for overflow so far), ``loss_scaler``, ``optimizer``.

    :meth:`step_on_device` is the same update (master grads, unscale, clip, step, scale update)
    with no host synchronisation, for wrapped optimizers that take ``found_inf`` (see
    :func:`supports_found_inf`).
    """

    def __init__(
        self,
        init_optimizer: torch.optim.Optimizer,
        static_loss_scale: float = 1.0,
        dynamic_loss_scale: bool = False,
        dynamic_loss_args: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        self.optimizer = init_optimizer
        self.loss_scaler = _build_scaler(static_loss_scale, dynamic_loss_scale, dynamic_loss_args)
        self.verbose = verbose
        self.overflow = False
        # bf16's static scale of 1.0 needs no unscaling multiply
        self._unit_scale = not dynamic_loss_scale and float(static_loss_scale) == 1.0
        self.model_params: list[torch.Tensor] = []  # what the optimizer updates, as the model holds it
        self.half_params: list[torch.Tensor] = []  # model params that have a master ...
        self.master_params: list[nn.Parameter] = []  # ... and their masters, in the same order
        for group in init_optimizer.param_groups:
            self._attach_masters(group["params"])
        if init_optimizer.state:  # recast pre-existing state (e.g. momenta) to the masters' dtype
            init_optimizer.load_state_dict(init_optimizer.state_dict())
        device = self.model_params[0].device if self.model_params else torch.device("cpu")
        self.loss_scaler.to(device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for overflow so far (read on the host)."""
        return int(self._skipped.item())

    def _attach_masters(self, params: list[torch.Tensor]) -> None:
        """Swap each half tensor of one param group's ``params`` list for its fp32 master."""
        for index, param in enumerate(params):
            self.model_params.append(param)
            if param.dtype == torch.float32:
                continue
            _check_half_dtype(param.dtype)
            master = _make_master(param)
            params[index] = master  # the list itself is kept: some optimizers (LBFGS) alias it
            if param in self.optimizer.state:
                self.optimizer.state[master] = self.optimizer.state.pop(param)
            self.half_params.append(param)
            self.master_params.append(master)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's groups (over the masters): what an lr scheduler drives."""
        return self.optimizer.param_groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return self.optimizer.state

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def _optimized_params(self) -> list[torch.Tensor]:
        """Masters and fp32 model params: the tensors the wrapped optimizer steps."""
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model params and of the masters."""
        for param in self.model_params + self.master_params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_()
                param.grad.zero_()

    def backward(
        self, loss: torch.Tensor, update_master_grads: bool = True, retain_graph: bool = False
    ) -> None:
        """Backpropagate ``loss * loss_scale`` into the model's grads.

        With ``update_master_grads=False`` (gradient accumulation) the caller must call
        :meth:`update_master_grads` once before :meth:`step`.
        """
        self.loss_scaler.backward(loss, retain_graph=retain_graph)
        if update_master_grads:
            self.update_master_grads()

    def update_master_grads(self) -> None:
        """Check the model grads for inf/nan; if clean, copy them to fp32 masters and unscale.

        Sets :attr:`overflow` (agreed over the model-parallel group; a collective).
        """
        self.overflow = self.loss_scaler.has_overflow(self.model_params)
        if self.overflow:
            return
        self._copy_model_grads_to_masters()
        self._unscale_master_grads()

    def _unscale_master_grads(self) -> None:
        grads = [param.grad for param in self._optimized_params() if param.grad is not None]
        if grads and not self._unit_scale:
            torch._foreach_mul_(grads, self.loss_scaler.scale_tensor.reciprocal().to(grads[0].device))

    @torch.no_grad()
    def _copy_model_grads_to_masters(self) -> None:
        """Widen the half grads into the masters' grads: one ``_foreach_copy_`` where both exist."""
        into, widened = [], []
        for model, master in zip(self.half_params, self.master_params):
            if model.grad is None:
                master.grad = None
            elif master.grad is None:
                master.grad = model.grad.detach().to(torch.float32, copy=True)
            else:
                into.append(master.grad)
                widened.append(model.grad)
        if into:
            torch._foreach_copy_(into, widened)

    def clip_master_grads(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the unscaled master grads to model-wide norm ``max_norm``; return the norm before.

        The norm covers the whole model across the model-parallel group (``mpu.clip_grad_norm``,
        a collective) once that group is initialized, else this process's parameters. Returns
        a 0-dim tensor; -1 when the last update overflowed (nothing is clipped then).
        """
        if self.overflow:
            return torch.tensor(-1.0)
        return self._clip(max_norm, norm_type)

    def _clip(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        params = self._optimized_params()
        if mpu.model_parallel_is_initialized():
            return mpu.clip_grad_norm(params, max_norm, norm_type)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def step_on_device(self, max_norm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After backward: update master grads, unscale, clip to ``max_norm`` (0: no clipping),
        step and update the loss scale, all without reading a value on the host.

        Overflow (an inf or nan gradient) is detected as in :meth:`update_master_grads`, agreed
        over the model-parallel group; with clipping it is a non-finite gradient norm, as on the
        fp32 path. An overflowed step is skipped by the wrapped optimizer itself (``found_inf``), so
        the scale, the skip counter and the masters change exactly as through :meth:`step`.
        Returns ``(found_inf, grad_norm)``: 0-dim tensors, 1.0 when the step was skipped, and
        the norm before clipping (None without clipping).
        """
        if not supports_found_inf(self.optimizer):
            raise TypeError(f"{type(self.optimizer).__name__} cannot skip a step on the device; "
                            "use update_master_grads/clip_master_grads/step (or a fused AdamW)")
        self._copy_model_grads_to_masters()
        self._unscale_master_grads()
        if max_norm > 0:
            # The norm of the widened grads is inf or nan exactly when one of them is, and is the
            # same on every model-parallel rank: it is the overflow check, with no pass of its own.
            grad_norm = self._clip(max_norm)
            found_inf = (~torch.isfinite(grad_norm)).float().to(self._skipped.device)
        else:
            grad_norm = None  # checked in fp32 (the widened grads): half reductions are slow on CPU
            found_inf = overflow_flag(self._optimized_params()).to(self._skipped.device)
        step_unless_found_inf(self.optimizer, found_inf)
        self.loss_scaler.update_scale(found_inf)
        self._skipped += found_inf.long()
        self._copy_masters_to_model()  # a skipped step copies back the unchanged masters
        return found_inf, grad_norm

    def step(self) -> bool:
        """Update the loss scale, then step the masters and copy them into the model.

        Returns True when the update was applied, False when it was skipped for overflow (the
        model and the optimizer state are then untouched and :attr:`skipped_steps` grows).
        """
        attempted_scale = self.loss_scale
        self.loss_scaler.update_scale(self.overflow)
        if self.overflow:
            self._skipped += 1
            if self.verbose:
                logger.warning(
                    "gradient overflow: skipping step; loss scale %s -> %s",
                    attempted_scale, self.loss_scale,
                )
            return False
        self.optimizer.step()
        self._copy_masters_to_model()
        return True

    @torch.no_grad()
    def _copy_masters_to_model(self) -> None:
        if self.half_params:
            torch._foreach_copy_(self.half_params, self.master_params)

    def state_dict(self) -> dict[str, Any]:
        """Loss-scaler state, counters, wrapped optimizer state and fp32 masters.

        Tensors and plain Python values only: loads under ``torch.load(weights_only=True)``.
        """
        return {
            "loss_scaler": self.loss_scaler.state_dict(),
            "dynamic_loss_scale": isinstance(self.loss_scaler, DynamicLossScaler),
            "overflow": self.overflow,
            "skipped_steps": self.skipped_steps,
            "optimizer_state_dict": self.optimizer.state_dict(),
            "fp32_from_fp16": [master.detach() for master in self.master_params],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved into an optimizer built the same way.

        The masters come from the checkpoint (exact fp32 values, not re-widened half weights);
        the model's own weights are loaded separately, from the model checkpoint.
        """
        saved_masters = state_dict["fp32_from_fp16"]
        if len(saved_masters) != len(self.master_params):
            raise ValueError(
                f"checkpoint holds {len(saved_masters)} fp32 master params but this optimizer has "
                f"{len(self.master_params)}; build the model and optimizer as for the checkpoint"
            )
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        self.overflow = bool(state_dict["overflow"])
        self._skipped.fill_(int(state_dict.get("skipped_steps", 0)))
        self.optimizer.load_state_dict(state_dict["optimizer_state_dict"])
        for master, saved in zip(self.master_params, saved_masters):
            master.copy_(saved)

