"""GPT-2 with tensor model parallelism (Megatron's ``GPT2Model``)."""

from __future__ import annotations

import torch
from torch import nn

from megatron import mpu

from .transformer import ParallelTransformer, build_gpt2_embeddings, draw_init_seed


class GPT2Model(nn.Module):
    """GPT-2: token + learned position embeddings, pre-LN blocks, output tied to the embedding.

    ``forward(input_ids (b, s), position_ids (b, s), attention_mask)`` returns logits
    ``(b, s, padded_vocab / mp)`` when ``parallel_output`` (feed them to
    ``mpu.vocab_parallel_cross_entropy``), else ``(b, s, padded_vocab)`` on every rank.
    ``attention_mask`` is None (plain causal) or ``(1 or b, 1, s, s)`` with ones where a token may
    attend.
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
    ) -> None:
        super().__init__()
        self.parallel_output = parallel_output
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        init_seed = draw_init_seed()
        self.word_embeddings, self.position_embeddings = build_gpt2_embeddings(
            vocab_size, hidden_size, max_sequence_length, init_method_std, init_seed)
        self.embedding_dropout = nn.Dropout(embedding_dropout_prob)
        self.transformer = ParallelTransformer(
            num_layers, hidden_size, num_attention_heads, attention_dropout_prob, output_dropout_prob,
            checkpoint_activations, checkpoint_num_layers, init_method_std, init_seed,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        hidden_states = self.transformer(self.embedding_dropout(embeddings), attention_mask)
        return self.logits(hidden_states)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Project onto the (tied) vocabulary; gathered across ranks unless ``parallel_output``."""
        hidden_parallel = mpu.copy_to_model_parallel_region(hidden_states)
        logits_parallel = torch.nn.functional.linear(hidden_parallel, self.word_embeddings.weight)
        if self.parallel_output:
            return logits_parallel
        return mpu.gather_from_model_parallel_region(logits_parallel)


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
