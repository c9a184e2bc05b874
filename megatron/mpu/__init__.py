"""Tensor model parallelism (Megatron's ``mpu``): groups, mappings, layers, loss, RNG, grads.

This package imports only torch. DeepSpeed receives this module as its ``mpu``.
"""

from .cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .data import broadcast_data
from .grads import clip_grad_norm, grad_norm, is_model_parallel_parameter
from .initialize import (
    communication_device,
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_src_rank,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_ranks,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    get_pipe_parallel_rank,
    get_pipe_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_model_parallel,
    partition_master_weight,
)
from .mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from .random import (
    CudaRNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    get_device_rng_state,
    model_parallel_cuda_manual_seed,
    set_device_rng_state,
)
from .utils import divide, ensure_divisibility, pad_vocab_size, split_tensor_along_last_dim

__all__ = [name for name in dir() if not name.startswith("_")]
