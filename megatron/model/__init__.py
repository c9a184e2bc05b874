"""Models built from ``megatron.mpu`` layers. Imports no training code."""

from .config import ModelConfig
from .gpt2_modeling import (
    GPT2Model,
    build_gpt2_model,
    gpt2_get_params_for_weight_decay_optimization,
)
from .kv_cache import KVCache, LayerKVCache
from .language_model import lm_loss, masked_mean, parallel_lm_logits, parallel_lm_loss
from .transformer import (
    ActivationCheckpointing,
    default_activation_checkpointing,
    use_activation_checkpointing,
)

__all__ = [
    "ActivationCheckpointing",
    "GPT2Model",
    "KVCache",
    "LayerKVCache",
    "ModelConfig",
    "build_gpt2_model",
    "default_activation_checkpointing",
    "gpt2_get_params_for_weight_decay_optimization",
    "lm_loss",
    "masked_mean",
    "parallel_lm_logits",
    "parallel_lm_loss",
    "use_activation_checkpointing",
]
