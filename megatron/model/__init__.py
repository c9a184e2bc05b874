"""Models built from ``megatron.mpu`` layers. Imports no training code."""

from .gpt2_modeling import GPT2Model, gpt2_get_params_for_weight_decay_optimization

__all__ = ["GPT2Model", "gpt2_get_params_for_weight_decay_optimization"]
