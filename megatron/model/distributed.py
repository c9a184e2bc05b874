"""Data-parallel gradient averaging for the Megatron path (DeepSpeed does its own)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron import mpu


class DistributedDataParallel(nn.Module):
    """Wraps a model; ``allreduce_params()`` averages gradients over the data-parallel group.

    Gradients are bucketed by dtype and all-reduced flat (in fp32 with ``fp32_allreduce``).
    Parameters start equal on every replica because initialisation is seeded identically.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def allreduce_params(self, fp32_allreduce: bool = False) -> None:
        group = mpu.get_data_parallel_group()
        world_size = mpu.get_data_parallel_world_size()
        if world_size == 1:
            return
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in self.module.parameters():
            if param.requires_grad and param.grad is not None:
                buckets.setdefault(param.grad.dtype, []).append(param.grad.data)
        for grads in buckets.values():
            coalesced = _flatten_dense_tensors(grads)
            if fp32_allreduce:
                coalesced = coalesced.float()
            coalesced.div_(world_size)
            dist.all_reduce(coalesced, group=group)
            for grad, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
                grad.copy_(synced)
