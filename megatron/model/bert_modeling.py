"""BERT/RoBERTa-style bidirectional encoder with tensor model parallelism.

Shapes: b = micro batch, s = sequence, h = hidden, v = padded vocabulary, mp = model-parallel size.
Attention is bidirectional: ``ParallelSelfAttention`` gets a ``(b, 1, 1, s)`` padding mask (it
is causal only when the mask is None). Post-LayerNorm (BERT: ``x = ln(x + f(x))``, LayerNorm on
the embeddings) or pre-LayerNorm (``x = x + f(ln(x))``, a final LayerNorm) is chosen at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu

from .dropout import Dropout
from .language_model import parallel_lm_logits
from .transformer import (
    LAYERNORM_EPSILON,
    InitMethod,
    ParallelMLP,
    ParallelSelfAttention,
    default_activation_checkpointing,
    init_method_normal,
    scaled_init_method,
)


@dataclass(frozen=True)
class BertConfig:
    """Architecture of ``BertModel`` (``vocab_size`` is the padded vocabulary)."""

    num_layers: int
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    max_sequence_length: int
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    num_tokentypes: int = 2  # 0: no token-type embedding (RoBERTa)
    pre_layernorm: bool = False  # False: BERT's post-LayerNorm
    binary_head: bool = True  # next-sentence / sentence-order classifier on [CLS]
    init_method_std: float = 0.02
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    parallel_output: bool = True


class BertEmbeddings(nn.Module):
    """Word (vocab-parallel) + learned position (+ token type) embeddings, [LayerNorm], dropout."""

    def __init__(self, config: BertConfig, init_method: InitMethod) -> None:
        super().__init__()
        self.word_embeddings = mpu.VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                          init_method=init_method)
        self.position_embeddings = nn.Embedding(config.max_sequence_length, config.hidden_size)
        init_method(self.position_embeddings.weight)
        self.tokentype_embeddings = None
        if config.num_tokentypes > 0:
            self.tokentype_embeddings = nn.Embedding(config.num_tokentypes, config.hidden_size)
            init_method(self.tokentype_embeddings.weight)
        post_ln = not config.pre_layernorm
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=LAYERNORM_EPSILON) if post_ln else None
        self.dropout = Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tokentype_ids: torch.Tensor | None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (b, s, h)
        if self.tokentype_embeddings is not None and tokentype_ids is not None:
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        if self.layernorm is not None:
            embeddings = self.layernorm(embeddings)
        return self.dropout(embeddings)


class BertLayer(nn.Module):
    """Self-attention + MLP from the mpu layers; post- or pre-LayerNorm residuals."""

    def __init__(self, config: BertConfig, init_method: InitMethod, output_init: InitMethod) -> None:
        super().__init__()
        self.pre_layernorm = config.pre_layernorm
        self.attention = ParallelSelfAttention(config.hidden_size, config.num_attention_heads,
                                               config.attention_dropout, config.hidden_dropout,
                                               init_method, output_init)
        self.attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYERNORM_EPSILON)
        self.mlp = ParallelMLP(config.hidden_size, config.hidden_dropout, init_method, output_init)
        self.mlp_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYERNORM_EPSILON)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pre_layernorm:
            hidden_states = hidden_states + self.attention(self.attention_layernorm(hidden_states), attention_mask)
            return hidden_states + self.mlp(self.mlp_layernorm(hidden_states))
        hidden_states = self.attention_layernorm(hidden_states + self.attention(hidden_states, attention_mask))
        return self.mlp_layernorm(hidden_states + self.mlp(hidden_states))


class BertEncoder(nn.Module):
    """``BertLayer``s (recomputed in backward through ``activation_checkpointing.checkpoint`` when
    asked; see ``use_activation_checkpointing``), then the final LayerNorm of the pre-LayerNorm
    variant."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        init_method = init_method_normal(config.init_method_std)
        output_init = scaled_init_method(config.init_method_std, config.num_layers)
        self.layers = nn.ModuleList(BertLayer(config, init_method, output_init) for _ in range(config.num_layers))
        self.final_layernorm = (nn.LayerNorm(config.hidden_size, eps=LAYERNORM_EPSILON)
                                if config.pre_layernorm else None)
        self.checkpoint_activations = config.checkpoint_activations
        self.checkpoint_num_layers = config.checkpoint_num_layers
        self.activation_checkpointing = default_activation_checkpointing()

    def _run_layers(self, start: int, end: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[start:end]:
                hidden_states = layer(hidden_states, attention_mask)
            return hidden_states

        return run

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            checkpoint = self.activation_checkpointing.checkpoint
            for start in range(0, len(self.layers), self.checkpoint_num_layers):
                end = min(start + self.checkpoint_num_layers, len(self.layers))
                hidden_states = checkpoint(self._run_layers(start, end), hidden_states, attention_mask)
        else:
            hidden_states = self._run_layers(0, len(self.layers))(hidden_states, attention_mask)
        return hidden_states if self.final_layernorm is None else self.final_layernorm(hidden_states)


class BertLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits against the (tied) word embedding plus a bias.

    The bias is split along the vocabulary like the embedding, so each rank adds its own slice.
    """

    def __init__(self, config: BertConfig, init_method: InitMethod) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        init_method(self.dense.weight)
        nn.init.zeros_(self.dense.bias)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=LAYERNORM_EPSILON)
        partition = mpu.divide(config.vocab_size, mpu.get_model_parallel_world_size())
        self.bias = nn.Parameter(torch.zeros(partition))
        mpu.mark_model_parallel(self.bias, partition_dim=0)
        self.parallel_output = config.parallel_output

    def forward(self, hidden_states: torch.Tensor, word_embedding_weight: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layernorm(F.gelu(self.dense(hidden_states)))
        return parallel_lm_logits(hidden_states, word_embedding_weight, self.parallel_output, self.bias)


class BertBinaryHead(nn.Module):
    """Pooler (dense + tanh on the [CLS] position) and a 2-way classifier (NSP or SOP)."""

    def __init__(self, config: BertConfig, init_method: InitMethod) -> None:
        super().__init__()
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, 2)
        for linear in (self.pooler, self.classifier):
            init_method(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(hidden_states[:, 0]))  # (b, h)
        return self.classifier(pooled)  # (b, 2)


class BertModel(nn.Module):
    """Encoder + masked-LM head (+ binary sentence head).

    ``forward(input_ids (b, s), padding_mask (b, s) ones on real tokens, tokentype_ids (b, s) or
    None, position_ids or None)`` returns ``(lm_logits, binary_logits)``: ``lm_logits`` is
    ``(b, s, v / mp)`` when ``parallel_output`` (for ``mpu.vocab_parallel_cross_entropy``), else
    ``(b, s, v)``; ``binary_logits`` is ``(b, 2)``, or None without the binary head.
    At model-parallel size 1 this is the serial model.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        init_method = init_method_normal(config.init_method_std)
        self.embeddings = BertEmbeddings(config, init_method)
        self.encoder = BertEncoder(config)
        self.lm_head = BertLMHead(config, init_method)
        self.binary_head = BertBinaryHead(config, init_method) if config.binary_head else None

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor,
                tokentype_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        attention_mask = padding_mask[:, None, None, :].to(torch.bool)  # (b, 1, 1, s): keys to attend
        hidden_states = self.encoder(self.embeddings(input_ids, position_ids, tokentype_ids), attention_mask)
        lm_logits = self.lm_head(hidden_states, self.embeddings.word_embeddings.weight)
        binary_logits = self.binary_head(hidden_states) if self.binary_head is not None else None
        return lm_logits, binary_logits
