"""GPT-2 with tensor model parallelism (Megatron's ``GPT2Model``)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .dropout import Dropout
from .kv_cache import KVCache
from .language_model import parallel_lm_logits, parallel_lm_loss
from .transformer import ParallelTransformer, build_gpt2_embeddings, draw_init_seed


class GPT2Model(nn.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, output tied to the embedding.

    ``forward(input_ids (b, s), position_ids (b, s), attention_mask)`` returns logits
    ``(b, s, padded_vocab / mp)`` when ``parallel_output`` (feed them to
    ``mpu.vocab_parallel_cross_entropy``), else ``(b, s, padded_vocab)`` on every rank.
    ``attention_mask`` is None (plain causal) or ``(1 or b, 1, s, s)`` with ones where a token may
    attend.

    Incremental decoding: with ``kv_cache`` (``KVCache.empty(num_layers)``, filled in place) the
    ``s`` tokens follow the ``past = kv_cache.length`` cached ones; position ids default to
    ``past .. past + s - 1``, attention is causal over cached + new keys, and ``attention_mask``
    may be ``(b, 1, s, past + s)`` booleans (True where a token may attend), e.g. to hide padding.
    The logits equal those of the uncached forward over the whole sequence at the new positions.
    ``last_logits_only`` returns the last position's logits only, ``(b, 1, ...)``: the vocabulary
    projection of a whole prompt is most of a prompt's cost at GPT-2's vocabulary.

    Training: with ``labels`` (b, s) (true vocabulary ids) the forward returns the per-token
    cross-entropy ``(b, s)`` in fp32 instead of the logits, over the first ``loss_vocab_size``
    columns (the tokenizer's vocabulary; None: all), through
    ``mpu.vocab_parallel_linear_cross_entropy``, which never keeps the logits. It equals
    ``mpu.vocab_parallel_cross_entropy`` of the returned logits.
    """

    def __init__(
        self,
        num_layers: int,
        vocab_size: int,
        hidden_size: int,
        num_attention_heads: int,
        embedding_dropout_prob: float,
        attention_dropout_prob: float,
        output_dropout_prob: float,
        max_sequence_length: int,
        checkpoint_activations: bool,
        checkpoint_num_layers: int = 1,
        parallel_output: bool = True,
        init_method_std: float = 0.02,
        loss_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.parallel_output = parallel_output
        self.vocab_size = vocab_size
        self.loss_vocab_size = loss_vocab_size
        self.max_sequence_length = max_sequence_length
        init_seed = draw_init_seed()
        self.word_embeddings, self.position_embeddings = build_gpt2_embeddings(
            vocab_size, hidden_size, max_sequence_length, init_method_std, init_seed)
        self.embedding_dropout = Dropout(embedding_dropout_prob)
        self.transformer = ParallelTransformer(
            num_layers, hidden_size, num_attention_heads, attention_dropout_prob, output_dropout_prob,
            checkpoint_activations, checkpoint_num_layers, init_method_std, init_seed,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_logits_only: bool = False,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, kv_cache)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        hidden_states = self.transformer(self.embedding_dropout(embeddings), attention_mask, kv_cache)
        if labels is not None:
            return parallel_lm_loss(hidden_states, self.word_embeddings.weight, labels, self.loss_vocab_size)
        if last_logits_only:
            hidden_states = hidden_states[:, -1:]  # decoding a prompt needs no other position's logits
        return self.logits(hidden_states)

    def _default_position_ids(self, input_ids: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """``(1, s)``: ``past .. past + s - 1`` after ``past`` cached positions."""
        past = 0 if kv_cache is None else kv_cache.length
        if past + input_ids.size(1) > self.max_sequence_length:
            raise ValueError(f"{past} cached + {input_ids.size(1)} new positions exceed max_sequence_length "
                             f"({self.max_sequence_length}): shorten the input")
        return torch.arange(past, past + input_ids.size(1), device=input_ids.device).unsqueeze(0)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Project onto the (tied) vocabulary; gathered across ranks unless ``parallel_output``."""
        return parallel_lm_logits(hidden_states, self.word_embeddings.weight, self.parallel_output)


def build_gpt2_model(config: ModelConfig, parallel_output: bool = True) -> GPT2Model:
    """``GPT2Model`` of ``config`` (training, inference and tools all build it here).

    Call it on every rank of a model-parallel group after ``mpu.initialize_model_parallel``: it
    draws the same initialisation seed from the default generator on each.
    """
    return GPT2Model(
        num_layers=config.num_layers, vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, embedding_dropout_prob=config.hidden_dropout,
        attention_dropout_prob=config.attention_dropout, output_dropout_prob=config.hidden_dropout,
        max_sequence_length=config.max_position_embeddings, checkpoint_activations=config.checkpoint_activations,
        checkpoint_num_layers=config.checkpoint_num_layers, parallel_output=parallel_output,
        init_method_std=config.init_method_std, loss_vocab_size=config.vocab_size)


def gpt2_get_params_for_weight_decay_optimization(module: nn.Module) -> list[dict]:
    """Two parameter groups: weights with decay, biases and LayerNorm parameters without."""
    decay, no_decay = [], []
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False):
            if isinstance(submodule, nn.LayerNorm) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
