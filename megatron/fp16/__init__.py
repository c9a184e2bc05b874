"""Torch-native half-precision training (replaces apex and Megatron's fp16 utilities)."""

from .fp16 import FP16_Module, FP16_Optimizer
from .loss_scaler import DynamicLossScaler, LossScaler

__all__ = ["DynamicLossScaler", "FP16_Module", "FP16_Optimizer", "LossScaler"]
