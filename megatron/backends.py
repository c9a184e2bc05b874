"""The one seam between the Megatron and the DeepSpeed training paths.

Both paths differ only in: initialisation, backward, optimizer step, the reported loss scale and
checkpoint files. ``build_backend`` picks one at start-up; the training loop calls the same
methods on either. This module (and ``arguments.py``) is the only place that imports deepspeed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.checkpointing import (
    check_model_config,
    megatron_checkpoint_name,
    read_megatron_file,
    save_torch_file,
)
from megatron.errors import ConfigError
from megatron.fp16 import FP16_Module, FP16_Optimizer, step_unless_found_inf, supports_found_inf
from megatron.learning_rates import AnnealingLR
from megatron.model.distributed import DistributedDataParallel
from megatron.model.gpt2_modeling import gpt2_get_params_for_weight_decay_optimization
from megatron.model.transformer import compile_transformer_layers

ForwardStep = Callable[[], torch.Tensor]


@dataclass
class StepResult:
    """One optimizer step, as 0-dim tensors that the trainer reads only when it logs."""

    loss: torch.Tensor  # mean over the micro batches, averaged over data-parallel ranks
    skipped: torch.Tensor  # 1.0 when the update was skipped (non-finite gradients), else 0.0
    grad_norm: torch.Tensor | None  # before clipping; None when not computed

    @staticmethod
    def from_host(loss: torch.Tensor, skipped: bool, grad_norm: float | None) -> StepResult:
        """For paths that know the outcome on the host already (DeepSpeed's engines)."""
        device = loss.device
        return StepResult(loss, torch.tensor(float(skipped), device=device),
                          None if grad_norm is None else torch.tensor(float(grad_norm), device=device))


def _param_dtype(args: argparse.Namespace) -> torch.dtype:
    return {"fp16": torch.half, "bf16": torch.bfloat16}.get(args.params_dtype, torch.float32)


def fused_adamw_available(device: torch.device) -> bool:
    """Whether this torch has a fused (one kernel per step) AdamW for ``device`` (CUDA; CPU since 2.4)."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def build_optimizer(param_groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW with decay off for biases and LayerNorm (groups from the model), fused where torch has it."""
    fused = fused_adamw_available(args.device)
    return torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=fused)


def maybe_compile(model: nn.Module, args: argparse.Namespace) -> None:
    """``--compile``: compile the model's transformer layers in place before any wrapper sees them."""
    if not getattr(args, "compile", False):
        return
    count = compile_transformer_layers(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f" > compiling {count} transformer layer{'' if count == 1 else 's'} with torch.compile "
              "(the first steps are slower)",
              flush=True)


def tensor_lr_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype in which torch's fused AdamW on ``device`` takes a tensor learning rate (None: it
    does not). Checked by one real step whose result must be the float-lr result."""
    for dtype in (torch.float64, torch.float32):
        param = nn.Parameter(torch.zeros(1, device=device))
        param.grad = torch.ones(1, device=device)
        try:
            torch.optim.AdamW([param], lr=torch.tensor(1e-3, dtype=dtype, device=device), weight_decay=0.0,
                              fused=True).step()
        except (RuntimeError, TypeError, ValueError):
            continue
        if abs(float(param.detach().cpu()) + 1e-3) < 1e-6:
            return dtype
    return None


def build_lr_scheduler(optimizer: Any, args: argparse.Namespace,
                       lr_tensor: torch.Tensor | None = None) -> AnnealingLR:
    return AnnealingLR(optimizer, start_lr=args.lr, warmup_iter=int(args.warmup * args.lr_decay_iters),
                       num_iters=args.lr_decay_iters, decay_style=args.lr_decay_style, last_iter=-1,
                       min_lr=args.min_lr, lr_tensor=lr_tensor)


def average_over_data_parallel(loss: torch.Tensor) -> torch.Tensor:
    reduced = loss.detach().clone().float()
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(reduced, group=mpu.get_data_parallel_group())
        reduced /= mpu.get_data_parallel_world_size()
    return reduced


class MegatronBackend:
    """Megatron-LM's own path: fp16/bf16 wrappers, explicit data-parallel all-reduce.

    With torch's fused AdamW (CUDA, and CPU since torch 2.4) a step reads nothing on the host:
    overflow and non-finite gradients skip the update inside the optimizer (``found_inf``), the
    loss scale and the learning-rate schedule advance on the device, and the loss, skip flag
    and gradient norm come back as tensors the trainer reads at log intervals. Other optimizers
    take the same decisions on the host (``sync_free`` False).
    """

    name = "megatron"

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.args = args
        if args.gradient_accumulation_steps is None:
            args.gradient_accumulation_steps = 1
        self.unwrapped_model = model
        maybe_compile(model, args)
        param_groups = gpt2_get_params_for_weight_decay_optimization(model)
        if args.params_dtype != "fp32":
            # Half logits go straight to the loss (mpu.vocab_parallel_cross_entropy reads them in fp32).
            model = FP16_Module(model, dtype=_param_dtype(args), cast_outputs=False)
        self.model = DistributedDataParallel(model, fp32_allreduce=args.fp32_allreduce)
        optimizer = build_optimizer(param_groups, args)
        if args.fp16:
            dynamic = args.loss_scale is None
            optimizer = FP16_Optimizer(optimizer, static_loss_scale=args.loss_scale or 1.0,
                                       dynamic_loss_scale=dynamic, dynamic_loss_args={
                                           "init_scale": args.initial_loss_scale,
                                           "scale_window": args.loss_scale_window,
                                           "min_scale": args.min_scale, "delayed_shift": args.hysteresis})
        elif args.bf16:
            optimizer = FP16_Optimizer(optimizer, static_loss_scale=1.0)
        self.optimizer = optimizer
        lr_dtype = tensor_lr_dtype(args.device) if supports_found_inf(self.base_optimizer) else None
        self.sync_free = lr_dtype is not None
        lr_tensor = torch.zeros((), dtype=lr_dtype, device=args.device) if self.sync_free else None
        self.lr_scheduler = build_lr_scheduler(optimizer, args, lr_tensor)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer (inside FP16_Optimizer for fp16/bf16)."""
        return self.optimizer.optimizer if isinstance(self.optimizer, FP16_Optimizer) else self.optimizer

    @property
    def half(self) -> bool:
        return isinstance(self.optimizer, FP16_Optimizer)

    def train_step(self, forward_step: ForwardStep, num_micro_batches: int, data_iterator: Any = None) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.args.device)
        for micro_batch in range(num_micro_batches):
            # Gradients start their data-parallel all-reduce during the last micro batch's backward.
            self.model.sync_gradients = micro_batch == num_micro_batches - 1
            loss = forward_step() / num_micro_batches
            if self.half:
                self.optimizer.backward(loss, update_master_grads=False)
            else:
                loss.backward()
            total += loss.detach().float()
        self.model.allreduce_params()
        if self.half:
            skipped, grad_norm = self._half_step()
        else:
            skipped, grad_norm = self._full_precision_step()
        self.lr_scheduler.step_applied(1.0 - skipped)
        return StepResult(average_over_data_parallel(total), skipped, grad_norm)

    def _half_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp16/bf16 masters: the wrapper detects inf/NaN (across model-parallel ranks) and skips."""
        if self.sync_free:
            return self.optimizer.step_on_device(self.args.clip_grad)
        self.optimizer.update_master_grads()
        grad_norm = None
        if self.args.clip_grad > 0:
            grad_norm = self.optimizer.clip_master_grads(self.args.clip_grad)
        return torch.tensor(float(not self.optimizer.step())), grad_norm

    def _full_precision_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32: skip the update when the gradient norm (the same on every rank) is not finite."""
        params = [p for p in self.unwrapped_model.parameters() if p.grad is not None]
        if self.args.clip_grad > 0:
            grad_norm = mpu.clip_grad_norm(params, self.args.clip_grad)
        else:
            grad_norm = mpu.grad_norm(params)
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.sync_free:
            step_unless_found_inf(self.optimizer, found_inf)
        elif not bool(found_inf):
            self.optimizer.step()
        return found_inf, grad_norm

    def loss_scale(self) -> float:
        return float(self.optimizer.loss_scale) if self.half else 1.0

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.unwrapped_model.parameters())

    def eval_loss(self, forward_step: Callable[..., torch.Tensor], data_iterator: Any) -> torch.Tensor:
        return forward_step(data_iterator, self.model, self.args)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def save_state(self, root: str, tag: str, client_state: dict[str, Any]) -> None:
        """Data-parallel rank 0 of each model-parallel rank writes ``model_optim_rng.pt``."""
        if mpu.get_data_parallel_rank() != 0:
            return
        state = dict(client_state)
        state["model"] = self.unwrapped_model.state_dict()
        if not self.args.no_save_optim:
            state["optimizer"] = self.optimizer.state_dict()
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        save_torch_file(state, megatron_checkpoint_name(root, tag, mpu.get_model_parallel_rank()))

    def load_state(self, root: str, tag: str, load_optimizer: bool) -> dict[str, Any]:
        path = megatron_checkpoint_name(root, tag, mpu.get_model_parallel_rank())
        if not os.path.isfile(path) and os.path.isfile(os.path.join(root, tag, "mp_rank_00_model_states.pt")):
            raise ConfigError(f"{os.path.join(root, tag)} is a DeepSpeed checkpoint: add --deepspeed to load it, "
                              "or convert it with tools/convert_checkpoint.py")
        state = read_megatron_file(path)
        check_model_config(state.get("model_config", {}), self.args, path)
        self.unwrapped_model.load_state_dict(state["model"])
        if load_optimizer and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return state


def build_backend(model: Any, args: argparse.Namespace) -> Any:
    """The Megatron backend, or with ``--deepspeed`` the DeepSpeed one (pipelined when
    ``model`` is a ``PipelineDescription``)."""
    if args.pipe_parallel_size > 1:
        from megatron.deepspeed_pipeline import PipelineBackend

        return PipelineBackend(model, args)
    if args.deepspeed:
        from megatron.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, args)
    return MegatronBackend(model, args)
