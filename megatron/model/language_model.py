"""The output side of a language model: vocabulary logits and the masked LM loss (from logits, or
fused with the output layer for training).

Shapes: b = micro batch, s = sequence, h = hidden, v = padded vocabulary, mp = model-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron import mpu


def parallel_lm_logits(hidden_states: torch.Tensor, word_embeddings_weight: torch.Tensor, parallel_output: bool,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``hidden_states (b, s, h)`` against this rank's slice of the (tied) word embedding
    ``(v / mp, h)`` (plus ``bias`` ``(v / mp,)``).

    Returns ``(b, s, v / mp)`` when ``parallel_output`` (for ``mpu.vocab_parallel_cross_entropy``),
    else ``(b, s, v)`` gathered on every rank. Every rank of the model-parallel group calls it:
    the backward all-reduces the gradient of ``hidden_states``, the gather communicates.
    """
    hidden_parallel = mpu.copy_to_model_parallel_region(hidden_states)
    logits_parallel = F.linear(hidden_parallel, word_embeddings_weight, bias)
    if parallel_output:
        return logits_parallel
    return mpu.gather_from_model_parallel_region(logits_parallel)


def parallel_lm_loss(hidden_states: torch.Tensor, word_embeddings_weight: torch.Tensor, labels: torch.Tensor,
                     vocab_size: int | None) -> torch.Tensor:
    """Per-token cross-entropy ``(b, s)`` (fp32) of the logits ``parallel_lm_logits`` would return,
    without keeping them (``mpu.vocab_parallel_linear_cross_entropy``); ``labels`` ``(b, s)`` are
    true-vocabulary ids, padding columns beyond ``vocab_size`` take no part in the softmax. Every
    rank of the model-parallel group calls it."""
    hidden_parallel = mpu.copy_to_model_parallel_region(hidden_states)
    return mpu.vocab_parallel_linear_cross_entropy(hidden_parallel, word_embeddings_weight, labels, vocab_size)


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``losses`` (b, s) over the positions where ``loss_mask`` is 1; a 0-dim fp32 tensor."""
    return torch.sum(losses * loss_mask) / loss_mask.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy over the positions where ``loss_mask`` (b, s) is 1; a 0-dim fp32 tensor.

    ``logits`` are vocab-parallel ``(b, s, v / mp)`` in any float dtype, ``labels`` ``(b, s)``
    true-vocabulary ids; padding columns beyond ``vocab_size`` take no part in the softmax.
    """
    losses = mpu.vocab_parallel_cross_entropy(logits.contiguous(), labels, vocab_size=vocab_size)
    return masked_mean(losses, loss_mask)
