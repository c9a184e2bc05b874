"""What the training loop and checkpointing may call on a backend, and the pieces the backends
share (optimizer, learning-rate schedule, data-parallel loss average).

A backend owns the model's wrappers, the optimizer, the schedule and its checkpoint files; the
loop sees only the ``Backend`` protocol. Implementations: ``megatron.backends.megatron``,
``megatron.backends.deepspeed`` and ``megatron.backends.pipeline``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megatron import mpu
from megatron.checkpoint.async_save import FileSink
from megatron.checkpoint.layout import StateCheck
from megatron.config import RunConfig
from megatron.errors import ConfigError
from megatron.training.schedule import AnnealingLR

# forward_step(data_iterator, model, run) -> the mean loss of one micro batch (0-dim fp32).
# data_iterator is None on ranks that do not read data (the batch is broadcast to them).
ForwardStep = Callable[[Iterator | None, nn.Module, RunConfig], torch.Tensor]
# pipeline_batch(data_iterator, run) -> (inputs, labels) of one micro batch for the pipeline engine.
PipelineBatchFn = Callable[[Iterator | None, RunConfig], tuple[Any, Any]]


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


class Backend(Protocol):
    """The seam between the training loop (and checkpointing) and one training path."""

    name: str  # "megatron", "deepspeed" or "deepspeed-pipeline" (printed at start-up)
    model: nn.Module  # what forward_step calls: the wrapped model, or the DeepSpeed engine
    rng_tracker: Any  # the model-parallel RNG tracker the model draws from (checkpoints carry its state)
    writes_deepspeed_latest: bool  # DeepSpeed's own tools look for <save>/latest

    def train_step(self, data_iterator: Iterator | None) -> StepResult:
        """Forward and backward of every micro batch of one step, then the optimizer step."""

    def eval_loss(self, data_iterator: Iterator | None) -> torch.Tensor:
        """Mean loss of one evaluation batch (call under ``torch.no_grad`` after ``eval()``)."""

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def learning_rate(self) -> float: ...

    def loss_scale(self) -> float: ...

    def parameters(self) -> list[torch.Tensor]:
        """This rank's share of the weights (ZeRO 3 partitions included)."""

    def save_state(self, root: str, tag: str, client_state: dict[str, Any], sink: FileSink | None = None) -> None:
        """Write this rank's files of checkpoint ``root/tag``, with ``client_state`` in them (to
        ``sink`` when given: copied to host memory for an asynchronous save)."""

    def load_state(self, root: str, tag: str, load_optimizer: bool, validate: StateCheck) -> dict[str, Any]:
        """Read checkpoint ``root/tag`` into the model (and optimizer); return its client state.

        ``validate(client_state)`` is called before the weights are applied where the format
        allows it (and otherwise right after reading).
        """


def fused_adamw_available(device: torch.device) -> bool:
    """Whether this torch has a fused (one kernel per step) AdamW for ``device`` (CUDA; CPU since 2.4)."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def build_optimizer(param_groups: list[dict], run: RunConfig) -> torch.optim.Optimizer:
    """AdamW with decay off for biases and LayerNorm (groups from the model), fused where torch has it."""
    settings = run.optimizer
    return torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay,
                             betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps,
                             fused=fused_adamw_available(run.device))


def build_lr_scheduler(optimizer: Any, run: RunConfig, lr_tensor: torch.Tensor | None = None) -> AnnealingLR:
    settings = run.optimizer
    return AnnealingLR(optimizer, start_lr=settings.lr, warmup_iter=settings.warmup_iters,
                       num_iters=settings.lr_decay_iters, decay_style=settings.lr_decay_style, last_iter=-1,
                       min_lr=settings.min_lr, lr_tensor=lr_tensor)


def maybe_compile(model: nn.Module, run: RunConfig) -> None:
    """``--compile``: compile the model's transformer layers in place before any wrapper sees them."""
    if not run.training.compile:
        return
    from megatron.model.transformer import compile_transformer_layers

    count = compile_transformer_layers(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f" > compiling {count} transformer layer{'' if count == 1 else 's'} with torch.compile "
              "(the first steps are slower)", flush=True)


def average_over_data_parallel(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` (0-dim) averaged over the data-parallel group, as fp32 (a copy)."""
    reduced = loss.detach().clone().float()
    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(reduced, group=mpu.get_data_parallel_group())
        reduced /= mpu.get_data_parallel_world_size()
    return reduced


# How to resume at each precision a checkpoint can be recognised as having been saved in.
_RESUME_FLAGS = {
    "fp32": "without --fp16 and --bf16; PRECISION=fp32 for the launch scripts",
    "fp16 or bf16": "--fp16 or --bf16 (bf16 on a CPU); PRECISION=fp16 or bf16 for the launch scripts",
    "bf16": "--bf16; PRECISION=bf16 for the launch scripts",
    "fp32 or fp16": "without --bf16, with --fp16 if it was an fp16 run on a GPU; PRECISION=fp32 or fp16 for the "
                    "launch scripts",
}


def precision_mismatch(checkpoint: str, saved: str, dtype: str) -> ConfigError:
    """The error for resuming ``checkpoint``, saved by a run in ``saved`` (a key of
    ``_RESUME_FLAGS``), in a run of precision ``dtype``: their optimizer states differ."""
    return ConfigError(f"{checkpoint} was saved by a run in {saved} and this run is in {dtype}: their optimizer "
                       f"states differ. Resume at the checkpoint's precision ({_RESUME_FLAGS[saved]}), pass "
                       "--no-load-optim to continue from its weights and iteration with a fresh optimizer, or "
                       "start a fresh run without --load (a new CHECKPOINT_PATH for the launch scripts)")
