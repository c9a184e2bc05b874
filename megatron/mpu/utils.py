"""Small helpers shared by the tensor-parallel primitives."""

from __future__ import annotations

import torch


def ensure_divisibility(numerator: int, denominator: int, what: str = "") -> None:
    """Raise ValueError unless ``denominator`` divides ``numerator``."""
    if denominator <= 0 or numerator % denominator != 0:
        label = f"{what} " if what else ""
        raise ValueError(f"{label}{numerator} is not divisible by {denominator}")


def divide(numerator: int, denominator: int) -> int:
    """Exact integer division; raises ValueError when it is not exact."""
    ensure_divisibility(numerator, denominator)
    return numerator // denominator


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension."""
    last_dim_size = divide(tensor.size(-1), num_partitions)
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


def vocab_range_for_rank(per_partition_vocab_size: int, rank: int) -> tuple[int, int]:
    """The half-open range ``[first, last)`` of vocabulary ids that ``rank`` owns."""
    first = rank * per_partition_vocab_size
    return first, first + per_partition_vocab_size


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by * model_parallel_size``.

    The padding makes the vocabulary split evenly across model-parallel ranks and keeps the
    output matrix a friendly shape for matmul kernels (Megatron's default multiple is 128).
    """
    multiple = make_vocab_size_divisible_by * model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
