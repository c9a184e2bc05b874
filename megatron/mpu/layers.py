"""Tensor-parallel layers: each composes a plain torch op with the mappings in ``mappings.py``.

Initialisation does not depend on the model-parallel size: every rank draws the *full* weight
from the default generator (seeded identically on all ranks) and keeps its own slice, so the
shards at size k are slices of the weights at size 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .initialize import get_model_parallel_rank, get_model_parallel_world_size
from .mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from .utils import divide, vocab_range_for_rank

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def mark_model_parallel(param: nn.Parameter, partition_dim: int, stride: int = 1) -> None:
    """Tag a sharded parameter so that norms and DeepSpeed count it on every rank."""
    param.model_parallel = True
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def partition_master_weight(
    master_weight: torch.Tensor, partition_dim: int, world_size: int, rank: int, stride: int = 1
) -> torch.Tensor:
    """This rank's slice of ``master_weight`` along ``partition_dim``.

    With ``stride`` s the dimension is cut into ``s * world_size`` chunks and rank r keeps chunks
    ``r, r + world_size, ...``: a fused [q; k; v] weight (s = 3) gives each rank its own heads'
    q, k and v.
    """
    if world_size == 1:
        return master_weight.clone()
    chunk = divide(master_weight.size(partition_dim), stride * world_size)
    chunks = torch.split(master_weight, chunk, dim=partition_dim)
    return torch.cat(chunks[rank::world_size], dim=partition_dim).contiguous()


def _init_sharded_weight(
    weight: nn.Parameter,
    full_shape: tuple[int, int],
    partition_dim: int,
    init_method: InitMethod,
    stride: int = 1,
) -> None:
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    shard = partition_master_weight(
        master, partition_dim, get_model_parallel_world_size(), get_model_parallel_rank(), stride
    )
    with torch.no_grad():
        weight.copy_(shard)
    mark_model_parallel(weight, partition_dim, stride)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary; each rank looks up the ids it owns.

    Ids outside ``[0, num_embeddings)`` fail on every model-parallel size (a RuntimeError on
    CPU, a device-side assert on GPUs) through ``torch._assert_async``, which checks on the
    device without stopping the host to read the answer.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, init_method: InitMethod = nn.init.xavier_normal_
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        world_size = get_model_parallel_world_size()
        self.num_embeddings_per_partition = divide(num_embeddings, world_size)
        self.vocab_start_index, self.vocab_end_index = vocab_range_for_rank(
            self.num_embeddings_per_partition, get_model_parallel_rank()
        )
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        _init_sharded_weight(self.weight, (num_embeddings, embedding_dim), 0, init_method)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        torch._assert_async(
            ((input_ >= 0) & (input_ < self.num_embeddings)).all(),
            f"a token id is outside the (padded) vocabulary of {self.num_embeddings}: the data was "
            "tokenised with another vocabulary",
        )
        if get_model_parallel_world_size() == 1:
            return F.embedding(input_, self.weight)
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        output = F.embedding(local_ids, self.weight)
        output = output.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_model_parallel_region(output)


class ColumnParallelLinear(nn.Module):
    """Y = XA + b with A split along its columns: rank r computes Y_r = X A_r + b_r.

    ``gather_output`` all-gathers the Y_r so every rank gets the full Y; otherwise the output
    stays split along its last dimension (to feed a ``RowParallelLinear``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        init_method: InitMethod = nn.init.xavier_normal_,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, get_model_parallel_world_size())
        # Stored as torch's (out, in) so that F.linear applies it directly.
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
        _init_sharded_weight(self.weight, (output_size, input_size), 0, init_method, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition))
            mark_model_parallel(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        input_parallel = copy_to_model_parallel_region(input_)
        output_parallel = F.linear(input_parallel, self.weight, self.bias)
        if self.gather_output:
            return gather_from_model_parallel_region(output_parallel)
        return output_parallel


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split along its rows and X along its last dimension.

    Each rank computes X_r A_r; the partial sums are all-reduced and the (replicated) bias is
    added once. ``input_is_parallel`` says X already arrives split (from a column-parallel layer).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: InitMethod = nn.init.xavier_normal_,
        stride: int = 1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = divide(input_size, get_model_parallel_world_size())
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition))
        _init_sharded_weight(self.weight, (output_size, input_size), 1, init_method, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            input_ = scatter_to_model_parallel_region(input_)
        output = reduce_from_model_parallel_region(F.linear(input_, self.weight))
        if self.bias is not None:
            output = output + self.bias
        return output
