"""Gradient norm and clipping across the model-parallel group."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .initialize import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
)


def is_model_parallel_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, "model_parallel", False))


def _counted_here(param: torch.Tensor) -> bool:
    """Sharded parameters count on every rank; replicated ones on model-parallel rank 0 only."""
    return is_model_parallel_parameter(param) or get_model_parallel_rank() == 0


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of the gradients of the whole (unsplit) model, the same on every mp rank.

    Returns a 0-dim fp32 tensor; reading it forces no host synchronisation.
    """
    grads = [p.grad for p in parameters if p.grad is not None and _counted_here(p)]
    device = grads[0].device if grads else torch.device("cpu")
    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        local = torch.stack([g.detach().abs().max().float() for g in grads]).max() if grads else None
        total = (local if local is not None else torch.zeros(())).to(device).float()
        if get_model_parallel_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=get_model_parallel_group())
        return total
    if grads:
        norms = torch._foreach_norm([g.detach().float() for g in grads], norm_type)
        local = torch.stack(norms).pow(norm_type).sum()
    else:
        local = torch.zeros(())
    total = local.to(device).float()
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=get_model_parallel_group())
    return total.pow(1.0 / norm_type)


def clip_grad_norm(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale gradients in place so that their model-wide norm is at most ``max_norm``.

    Every rank of the model-parallel group must call it. Returns the norm before clipping.
    """
    parameters = [p for p in parameters if p.grad is not None]
    total_norm = grad_norm(parameters, norm_type)
    clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp(max=1.0)
    grads = [p.grad.detach() for p in parameters]
    if grads:
        torch._foreach_mul_(grads, clip_coef.to(grads[0].device))
    return total_norm
