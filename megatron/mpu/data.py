"""Send a batch read on model-parallel rank 0 to the other ranks of its group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import (
    communication_device,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
)

_MAX_DIMS = 8


def _broadcast_shapes(keys: list[str], data: dict[str, torch.Tensor] | None) -> list[torch.Size]:
    device = communication_device()
    sizes = torch.zeros(len(keys), _MAX_DIMS, dtype=torch.long, device=device)
    if get_model_parallel_rank() == 0:
        for i, key in enumerate(keys):
            shape = data[key].shape
            if len(shape) >= _MAX_DIMS:
                raise ValueError(f"broadcast_data supports fewer than {_MAX_DIMS} dims, {key} has {len(shape)}")
            sizes[i, : len(shape)] = torch.tensor(shape)
            sizes[i, len(shape)] = -1
    if get_model_parallel_world_size() > 1:
        dist.broadcast(sizes, get_model_parallel_src_rank(), group=get_model_parallel_group())
    shapes = []
    for row in sizes.tolist():
        shapes.append(torch.Size(row[: row.index(-1)]))
    return shapes


def _check_dtypes(keys: list[str], data: dict[str, torch.Tensor], datatype: torch.dtype) -> None:
    for key in keys:
        if data[key].dtype != datatype:
            raise TypeError(f"{key} has dtype {data[key].dtype}, expected {datatype}")


def broadcast_data(
    keys: list[str], data: dict[str, torch.Tensor] | None, datatype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Broadcast ``data[key]`` for each key from model-parallel rank 0 to its group.

    Only rank 0 of each model-parallel group needs ``data``; the others may pass None. Every
    tensor must have dtype ``datatype``. Returns the tensors on the communication device.
    """
    device = communication_device()
    if get_model_parallel_world_size() == 1:  # nothing to send: no shape exchange, no host read
        _check_dtypes(keys, data, datatype)
        return {key: data[key].to(device, non_blocking=True) for key in keys}
    shapes = _broadcast_shapes(keys, data)
    if get_model_parallel_rank() == 0:
        _check_dtypes(keys, data, datatype)
        flat = torch.cat([data[key].reshape(-1) for key in keys]).to(device)
    else:
        flat = torch.empty(sum(s.numel() for s in shapes), dtype=datatype, device=device)
    if get_model_parallel_world_size() > 1:
        dist.broadcast(flat, get_model_parallel_src_rank(), group=get_model_parallel_group())
    output, offset = {}, 0
    for key, shape in zip(keys, shapes):
        output[key] = flat[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    return output
