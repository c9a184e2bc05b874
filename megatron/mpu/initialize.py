"""Model-parallel and data-parallel process groups.

Ranks are laid out as Megatron lays them out: the ``model_parallel_size`` consecutive ranks
``[k * mp, (k + 1) * mp)`` form one model-parallel group, and ranks with the same position inside
their model-parallel group form a data-parallel group (``[i, i + mp, i + 2 mp, ...]``). With a
pipeline dimension (``pipe_parallel_size > 1``) the layout follows DeepSpeed's
pipe x data x model topology, model varying fastest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_MODEL_PARALLEL_GROUP: dist.ProcessGroup | None = None
_DATA_PARALLEL_GROUP: dist.ProcessGroup | None = None
_MODEL_PARALLEL_RANKS: list[int] | None = None
_DATA_PARALLEL_RANKS: list[int] | None = None
_PIPE_PARALLEL_SIZE: int = 1
_PIPE_PARALLEL_RANK: int = 0


def initialize_model_parallel(model_parallel_size: int, pipe_parallel_size: int = 1) -> None:
    """Create the model- and data-parallel groups; every rank must call it.

    Raises ValueError when the world size is not divisible by
    ``model_parallel_size * pipe_parallel_size``.
    """
    global _MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _PIPE_PARALLEL_SIZE, _PIPE_PARALLEL_RANK
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before initialize_model_parallel")
    if _MODEL_PARALLEL_GROUP is not None:
        raise RuntimeError("model parallel groups are already initialized")
    world_size = dist.get_world_size()
    if model_parallel_size < 1 or pipe_parallel_size < 1:
        raise ValueError(
            f"--model-parallel-size ({model_parallel_size}) and --pipe-parallel-size "
            f"({pipe_parallel_size}) must be at least 1"
        )
    per_replica = model_parallel_size * pipe_parallel_size
    if world_size % per_replica != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by --model-parallel-size "
            f"({model_parallel_size}) x --pipe-parallel-size ({pipe_parallel_size}); "
            f"launch a multiple of {per_replica} processes or change the parallel sizes"
        )
    data_parallel_size = world_size // per_replica
    rank = dist.get_rank()

    # Rank = ((pipe * dp) + data) * mp + model, model fastest (DeepSpeed's PipeModelDataParallelTopology).
    def rank_of(pipe: int, data: int, model: int) -> int:
        return (pipe * data_parallel_size + data) * model_parallel_size + model

    for pipe in range(pipe_parallel_size):
        for data in range(data_parallel_size):
            ranks = [rank_of(pipe, data, m) for m in range(model_parallel_size)]
            group = dist.new_group(ranks)
            if rank in ranks:
                _MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS = group, ranks
                _PIPE_PARALLEL_RANK = pipe
        for model in range(model_parallel_size):
            ranks = [rank_of(pipe, d, model) for d in range(data_parallel_size)]
            group = dist.new_group(ranks)
            if rank in ranks:
                _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = group, ranks
    _PIPE_PARALLEL_SIZE = pipe_parallel_size


def model_parallel_is_initialized() -> bool:
    return _MODEL_PARALLEL_GROUP is not None and _DATA_PARALLEL_GROUP is not None


def _require_initialized() -> None:
    if not model_parallel_is_initialized():
        raise RuntimeError("call megatron.mpu.initialize_model_parallel() first")


def get_model_parallel_group() -> dist.ProcessGroup:
    _require_initialized()
    return _MODEL_PARALLEL_GROUP


def get_data_parallel_group() -> dist.ProcessGroup:
    _require_initialized()
    return _DATA_PARALLEL_GROUP


def get_model_parallel_world_size() -> int:
    _require_initialized()
    return len(_MODEL_PARALLEL_RANKS)


def get_model_parallel_rank() -> int:
    _require_initialized()
    return _MODEL_PARALLEL_RANKS.index(dist.get_rank())


def get_model_parallel_src_rank() -> int:
    """Global rank of model-parallel rank 0 in this rank's model-parallel group."""
    _require_initialized()
    return _MODEL_PARALLEL_RANKS[0]


def get_model_parallel_ranks() -> list[int]:
    _require_initialized()
    return list(_MODEL_PARALLEL_RANKS)


def get_data_parallel_world_size() -> int:
    _require_initialized()
    return len(_DATA_PARALLEL_RANKS)


def get_data_parallel_rank() -> int:
    _require_initialized()
    return _DATA_PARALLEL_RANKS.index(dist.get_rank())


def get_data_parallel_src_rank() -> int:
    _require_initialized()
    return _DATA_PARALLEL_RANKS[0]


def get_pipe_parallel_world_size() -> int:
    return _PIPE_PARALLEL_SIZE


def get_pipe_parallel_rank() -> int:
    return _PIPE_PARALLEL_RANK


# DeepSpeed looks for the "tensor" spellings first; they mean the same here.
get_tensor_model_parallel_group = get_model_parallel_group
get_tensor_model_parallel_world_size = get_model_parallel_world_size
get_tensor_model_parallel_rank = get_model_parallel_rank
get_tensor_model_parallel_src_rank = get_model_parallel_src_rank


def destroy_model_parallel() -> None:
    """Forget the groups (the process groups themselves are freed with the default group)."""
    global _MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP, _MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_RANKS, _PIPE_PARALLEL_SIZE, _PIPE_PARALLEL_RANK
    _MODEL_PARALLEL_GROUP = None
    _DATA_PARALLEL_GROUP = None
    _MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_RANKS = None
    _PIPE_PARALLEL_SIZE = 1
    _PIPE_PARALLEL_RANK = 0


def communication_device() -> torch.device:
    """Where tensors must live for collectives of the default backend (gloo: CPU, nccl: CUDA)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
