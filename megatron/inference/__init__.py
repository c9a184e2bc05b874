"""Inference on a trained GPT-2: load a checkpoint at any model-parallel size, generate in batches.

``loading``: checkpoint -> model on every rank. ``generation``: batched decoding through
``GPT2Model.forward(..., kv_cache=...)`` (no attention code of its own).
"""

from .generation import (
    DecodingBatch,
    SamplingSettings,
    StoppingRule,
    choose_tokens,
    filter_logits,
    generate,
    prompt_generator,
)
from .loading import (
    InferenceConfig,
    InferenceModel,
    add_inference_args,
    inference_config,
    load_inference_model,
    load_serial_weights,
    model_config_from_checkpoint,
)

__all__ = [
    "DecodingBatch",
    "InferenceConfig",
    "InferenceModel",
    "SamplingSettings",
    "StoppingRule",
    "add_inference_args",
    "choose_tokens",
    "filter_logits",
    "generate",
    "inference_config",
    "load_inference_model",
    "load_serial_weights",
    "model_config_from_checkpoint",
    "prompt_generator",
]
