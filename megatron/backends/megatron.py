"""Megatron-LM's own training path: fp16/bf16 wrappers, explicit data-parallel all-reduce, and
checkpoints in Megatron's layout (``mp_rank_XX/model_optim_rng.pt``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megatron import mpu
from megatron.backends.base import (
    ForwardStep,
    StateCheck,
    StepResult,
    average_over_data_parallel,
    build_lr_scheduler,
    build_optimizer,
    maybe_compile,
    precision_mismatch,
)
from megatron.checkpoint.async_save import FileSink
from megatron.checkpoint.convert import optimizer_param_names
from megatron.checkpoint.layout import (
    Topology,
    megatron_checkpoint_name,
    read_megatron_file,
    save_torch_file,
)
from megatron.checkpoint.reshard import (
    NATIVE,
    announce,
    describe,
    plan_resume,
    saved_topology,
    staged_copy,
    universal_copy_converter,
)
from megatron.checkpoint.universal import (
    MOMENTS,
    read_client_state,
    read_optimizer_state,
    read_slice,
    read_step,
)
from megatron.config import RunConfig
from megatron.errors import ConfigError
from megatron.fp16 import FP16_Module, FP16_Optimizer, step_unless_found_inf, supports_found_inf
from megatron.model.distributed import DistributedDataParallel
from megatron.model.gpt2_modeling import gpt2_get_params_for_weight_decay_optimization

# What a universal copy's parameter groups give the optimizer (the learning rate comes from the schedule).
ADAM_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


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


def wrap_optimizer(optimizer: torch.optim.Optimizer, run: RunConfig) -> torch.optim.Optimizer | FP16_Optimizer:
    """fp16: fp32 masters with static or dynamic loss scaling; bf16: fp32 masters; fp32: as is."""
    precision = run.precision
    if precision.fp16:
        return FP16_Optimizer(optimizer, static_loss_scale=precision.loss_scale or 1.0,
                              dynamic_loss_scale=precision.loss_scale is None, dynamic_loss_args={
                                  "init_scale": precision.initial_loss_scale,
                                  "scale_window": precision.loss_scale_window,
                                  "min_scale": precision.min_scale, "delayed_shift": precision.hysteresis})
    if precision.bf16:
        return FP16_Optimizer(optimizer, static_loss_scale=1.0)
    return optimizer


def check_saved_precision(saved_optimizer: Any, path: str, dtype: str) -> None:
    """ConfigError when a checkpoint's optimizer state is of the other kind than this run's: fp32
    runs save the optimizer's own state, fp16 and bf16 runs ``FP16_Optimizer``'s (with fp32 masters)."""
    saved_half = isinstance(saved_optimizer, dict) and "fp32_from_fp16" in saved_optimizer
    if saved_half != (dtype != "fp32"):
        raise precision_mismatch(f"checkpoint {path}", "fp16 or bf16" if saved_half else "fp32", dtype)


class MegatronBackend:
    """Megatron-LM's own path: fp16/bf16 wrappers, explicit data-parallel all-reduce.

    With torch's fused AdamW (CUDA, and CPU since torch 2.4) a step reads nothing on the host:
    overflow and non-finite gradients skip the update inside the optimizer (``found_inf``), the
    loss scale and the learning-rate schedule advance on the device, and the loss, skip flag
    and gradient norm come back as tensors the trainer reads at log intervals. Other optimizers
    take the same decisions on the host (``sync_free`` False).
    """

    name = "megatron"
    writes_deepspeed_latest = False

    def __init__(self, model: nn.Module, run: RunConfig, forward_step: ForwardStep) -> None:
        self.run = run
        self.forward_step = forward_step
        self.rng_tracker = mpu.get_cuda_rng_tracker()
        self.unwrapped_model = model
        maybe_compile(model, run)
        param_groups = gpt2_get_params_for_weight_decay_optimization(model)
        if run.precision.dtype != "fp32":
            # Half logits go straight to the loss (mpu.vocab_parallel_cross_entropy reads them in fp32).
            model = FP16_Module(model, dtype=run.precision.torch_dtype, cast_outputs=False)
        self.model = DistributedDataParallel(model, fp32_allreduce=run.precision.fp32_allreduce)
        self.optimizer = wrap_optimizer(build_optimizer(param_groups, run), run)
        lr_dtype = tensor_lr_dtype(run.device) if supports_found_inf(self.base_optimizer) else None
        self.sync_free = lr_dtype is not None
        lr_tensor = torch.zeros((), dtype=lr_dtype, device=run.device) if self.sync_free else None
        self.lr_scheduler = build_lr_scheduler(self.optimizer, run, lr_tensor)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer (inside FP16_Optimizer for fp16/bf16)."""
        return self.optimizer.optimizer if isinstance(self.optimizer, FP16_Optimizer) else self.optimizer

    @property
    def half(self) -> bool:
        return isinstance(self.optimizer, FP16_Optimizer)

    def train_step(self, data_iterator: Iterator | None) -> StepResult:
        num_micro_batches = self.run.training.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.run.device)
        for micro_batch in range(num_micro_batches):
            # Gradients start their data-parallel all-reduce during the last micro batch's backward.
            self.model.sync_gradients = micro_batch == num_micro_batches - 1
            loss = self.forward_step(data_iterator, self.model, self.run) / num_micro_batches
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
        clip_grad = self.run.optimizer.clip_grad
        if self.sync_free:
            return self.optimizer.step_on_device(clip_grad)
        self.optimizer.update_master_grads()
        grad_norm = None
        if clip_grad > 0:
            grad_norm = self.optimizer.clip_master_grads(clip_grad)
        return torch.tensor(float(not self.optimizer.step())), grad_norm

    def _full_precision_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32: skip the update when the gradient norm (the same on every rank) is not finite."""
        params = [p for p in self.unwrapped_model.parameters() if p.grad is not None]
        clip_grad = self.run.optimizer.clip_grad
        grad_norm = mpu.clip_grad_norm(params, clip_grad) if clip_grad > 0 else mpu.grad_norm(params)
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.sync_free:
            step_unless_found_inf(self.optimizer, found_inf)
        elif not bool(found_inf):
            self.optimizer.step()
        return found_inf, grad_norm

    def eval_loss(self, data_iterator: Iterator | None) -> torch.Tensor:
        return self.forward_step(data_iterator, self.model, self.run)

    def loss_scale(self) -> float:
        return float(self.optimizer.loss_scale) if self.half else 1.0

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.unwrapped_model.parameters())

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def save_state(self, root: str, tag: str, client_state: dict[str, Any], sink: FileSink | None = None) -> None:
        """Data-parallel rank 0 of each model-parallel rank writes ``model_optim_rng.pt``."""
        if mpu.get_data_parallel_rank() != 0:
            return
        state = dict(client_state)
        state["model"] = self.unwrapped_model.state_dict()
        if self.run.checkpoint.save_optim:
            state["optimizer"] = self.optimizer.state_dict()
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        path = megatron_checkpoint_name(root, tag, mpu.get_model_parallel_rank())
        if sink is None:
            save_torch_file(state, path)
        else:
            sink.save(state, path)

    def load_state(self, root: str, tag: str, load_optimizer: bool, validate: StateCheck) -> dict[str, Any]:
        directory = os.path.join(root, tag)
        current = Topology.of(self.run, self.name)
        saved = saved_topology(directory, current)
        if plan_resume(saved, current, directory) != NATIVE:
            convert = universal_copy_converter(directory, self.run, current, load_optimizer, validate)
            with staged_copy(self.run, root, tag, f"{describe(saved)} -> {describe(current)}", convert) as copy:
                state = self._load_universal(copy, load_optimizer)
            announce(directory, saved, current, load_optimizer, "a universal copy (one folder per parameter)")
            return state
        path = megatron_checkpoint_name(root, tag, mpu.get_model_parallel_rank())
        if not os.path.isfile(path) and os.path.isfile(os.path.join(root, tag, "mp_rank_00_model_states.pt")):
            raise ConfigError(f"{os.path.join(root, tag)} is a DeepSpeed checkpoint: add --deepspeed to load it, "
                              "or convert it with tools/convert_checkpoint.py")
        state = read_megatron_file(path)
        validate(state)
        if load_optimizer and "optimizer" not in state and state.get("iteration", 0) > 0:
            raise ConfigError(f"checkpoint {path} holds no optimizer state (saved with --no-save-optim): pass "
                              "--no-load-optim to start a fresh optimizer and learning-rate schedule from its "
                              "weights and iteration, or --finetune to start over at iteration 0")
        if load_optimizer and "optimizer" in state:
            check_saved_precision(state["optimizer"], path, self.run.precision.dtype)
        self.unwrapped_model.load_state_dict(state["model"])
        if load_optimizer and "optimizer" in state:  # iteration 0 (from-hf) has no optimizer state to lose
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return state

    def _load_universal(self, copy: str, load_optimizer: bool) -> dict[str, Any]:
        """This rank's slices of a universal copy (``megatron.checkpoint.universal``): weights, and
        with ``load_optimizer`` the fp32 masters, Adam moments and step, and the schedule."""
        state = read_client_state(copy, mpu.get_model_parallel_rank())
        params = dict(self.unwrapped_model.named_parameters())
        weights = {name: read_slice(copy, name, "fp32", param.shape) for name, param in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        saved = read_optimizer_state(copy)
        if load_optimizer and saved["has_optimizer_state"]:  # none: an iteration-0 (from-hf) checkpoint
            self.optimizer.load_state_dict(self._universal_optimizer_state(copy, saved, list(params), weights))
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return state

    def _universal_optimizer_state(self, copy: str, saved: dict[str, Any], names: list[str],
                                   weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """This run's optimizer ``state_dict`` filled from a universal copy: Adam state by the
        optimizer's parameter order, the saved hyper-parameters, fp32 masters for fp16/bf16 (the
        loss scale of a Megatron fp16 checkpoint, else this run's)."""
        full = self.optimizer.state_dict()
        inner = full["optimizer_state_dict"] if self.half else full
        order = optimizer_param_names(names)
        for index, name in enumerate(order):
            shape = weights[name].shape
            inner["state"][index] = {"step": read_step(copy, name),
                                     **{key: read_slice(copy, name, key, shape) for key in MOMENTS}}
        for group, values in zip(inner["param_groups"], saved["param_groups"], strict=True):
            group.update({key: values[key] for key in ADAM_HYPERPARAMETERS if key in values})
        if self.half:
            full["fp32_from_fp16"] = [weights[name] for name in order]
            scaler = saved.get("loss_scaler_state")
            if scaler and scaler.get("dynamic_loss_scale") == full["dynamic_loss_scale"]:
                full.update(scaler)
        return full
