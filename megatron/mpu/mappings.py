"""The four communication mappings of tensor parallelism, as conjugate autograd functions.

copy   (forward: identity,          backward: all-reduce)
reduce (forward: all-reduce,        backward: identity)
scatter(forward: keep my last-dim slice, backward: all-gather along the last dim)
gather (forward: all-gather along the last dim, backward: keep my slice)

Every rank of the model-parallel group calls each of them with tensors of the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
)
from .utils import split_tensor_along_last_dim


def _reduce(input_: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return input_
    dist.all_reduce(input_, group=get_model_parallel_group())
    return input_


def _split(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_model_parallel_world_size()
    if world_size == 1:
        return input_
    return split_tensor_along_last_dim(input_, world_size)[get_model_parallel_rank()].contiguous()


def _gather(input_: torch.Tensor) -> torch.Tensor:
    world_size = get_model_parallel_world_size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    pieces = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(pieces, input_, group=get_model_parallel_group())
    return torch.cat(pieces, dim=-1)


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce(grad_output.clone())


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _reduce(input_.clone())

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _split(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather(grad_output)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_):
        return _gather(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _split(grad_output)


# At model-parallel size 1 every mapping is the identity both ways: return the input without an
# autograd node (a few microseconds per call, a dozen calls per layer per decoded token).


def copy_to_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return input_
    return _CopyToModelParallelRegion.apply(input_)


def reduce_from_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return input_
    return _ReduceFromModelParallelRegion.apply(input_)


def scatter_to_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return input_
    return _ScatterToModelParallelRegion.apply(input_)


def gather_from_model_parallel_region(input_: torch.Tensor) -> torch.Tensor:
    if get_model_parallel_world_size() == 1:
        return input_
    return _GatherFromModelParallelRegion.apply(input_)
