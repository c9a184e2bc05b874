"""Torch-native half-precision training (replaces apex and Megatron's fp16 utilities)."""

from .fp16 import FP16_Module, FP16_Optimizer, step_unless_found_inf, supports_found_inf
from .loss_scaler import DynamicLossScaler, LossScaler

__all__ = ["DynamicLossScaler", "FP16_Module", "FP16_Optimizer", "LossScaler", "step_unless_found_inf",
           "supports_found_inf"]
