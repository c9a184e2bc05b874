"""GPT-2 as a sequence of blocks for pipeline parallelism (DeepSpeed's ``PipelineModule``).

Blocks: ``EmbeddingPipe`` (first stage), ``TransformerLayerPipe`` x L, ``FinalLayerNormPipe``,
and the output projection, which is ``EmbeddingPipe.logits`` on a second copy of the embedding
tied to the first (last stage). Each block initialises from its own seed (see
``transformer.seeded_init``), so a pipelined model starts from exactly the weights of
``GPT2Model`` with the same seed. This module imports no DeepSpeed; the seam assembles the specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .dropout import Dropout
from .language_model import lm_loss, parallel_lm_logits
from .transformer import (
    LAYERNORM_EPSILON,
    ParallelTransformerLayer,
    build_gpt2_embeddings,
    draw_init_seed,
    init_method_normal,
    scaled_init_method,
    seeded_init,
)


class EmbeddingPipe(nn.Module):
    """Token + position embeddings and dropout; also the tied output projection."""

    def __init__(self, vocab_size: int, hidden_size: int, max_sequence_length: int,
                 embedding_dropout_prob: float, init_method_std: float, init_seed: int) -> None:
        super().__init__()
        self.word_embeddings, self.position_embeddings = build_gpt2_embeddings(
            vocab_size, hidden_size, max_sequence_length, init_method_std, init_seed)
        self.embedding_dropout = Dropout(embedding_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.embedding_dropout(embeddings)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``(b, s, padded_vocab / mp)``."""
        return parallel_lm_logits(hidden_states, self.word_embeddings.weight, parallel_output=True)


class TransformerLayerPipe(ParallelTransformerLayer):
    """Transformer layer ``index`` taking and returning hidden states only (plain causal attention),
    initialised exactly as ``GPT2Model``'s layer ``index`` for the same ``init_seed``."""

    def __init__(self, index: int, num_layers: int, hidden_size: int, num_attention_heads: int,
                 attention_dropout_prob: float, output_dropout_prob: float, init_method_std: float,
                 init_seed: int) -> None:
        with seeded_init(init_seed + 1 + index):
            super().__init__(hidden_size, num_attention_heads, attention_dropout_prob, output_dropout_prob,
                             init_method_normal(init_method_std), scaled_init_method(init_method_std, num_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(hidden_states, None)


class FinalLayerNormPipe(nn.LayerNorm):
    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, eps=LAYERNORM_EPSILON)


def embedding_output(module: EmbeddingPipe, hidden_states: torch.Tensor) -> torch.Tensor:
    """``forward_fn`` of the tied copy of the embedding on the last stage."""
    return module.logits(hidden_states)


class PipelineLoss:
    """Mean masked cross-entropy of vocab-parallel logits against ``(labels, loss_mask)``."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, loss_mask = labels
        return lm_loss(logits, targets, loss_mask, self.vocab_size)


@dataclass
class PipeBlock:
    """One entry of the pipeline: ``module_class(**kwargs)``, optionally tied by ``tied_key``."""

    module_class: type[nn.Module]
    kwargs: dict[str, Any]
    tied_key: str | None = None
    tied_weight_attr: str | None = None
    forward_fn: Callable[..., torch.Tensor] | None = None


@dataclass
class PipelineDescription:
    """What ``model_provider`` returns when the model is pipelined; the seam builds it."""

    blocks: list[PipeBlock]
    loss_fn: Callable[..., torch.Tensor]


def gpt2_pipeline_description(config: ModelConfig) -> PipelineDescription:
    """GPT-2 of ``config`` as blocks; call where ``build_gpt2_model`` would be (it draws the same
    init seed, so the pipelined model starts from the same weights)."""
    init_seed = draw_init_seed()
    embedding = dict(vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
                     max_sequence_length=config.max_position_embeddings,
                     embedding_dropout_prob=config.hidden_dropout, init_method_std=config.init_method_std,
                     init_seed=init_seed)
    blocks = [PipeBlock(EmbeddingPipe, embedding, tied_key="embed", tied_weight_attr="word_embeddings.weight")]
    for index in range(config.num_layers):
        blocks.append(PipeBlock(TransformerLayerPipe, dict(
            index=index, num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads, attention_dropout_prob=config.attention_dropout,
            output_dropout_prob=config.hidden_dropout, init_method_std=config.init_method_std,
            init_seed=init_seed)))
    blocks.append(PipeBlock(FinalLayerNormPipe, dict(hidden_size=config.hidden_size)))
    blocks.append(PipeBlock(EmbeddingPipe, embedding, tied_key="embed", tied_weight_attr="word_embeddings.weight",
                            forward_fn=embedding_output))
    return PipelineDescription(blocks, PipelineLoss(config.vocab_size))
