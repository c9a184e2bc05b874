"""``ModelConfig``: the transformer's shape, shared by GPT-2 and BERT (Megatron-Core's
``TransformerConfig``, nanoGPT's ``GPTConfig``).

Built once at start-up (``arguments.build_run_config``, or from a checkpoint for inference) and
never changed afterwards; every model of this package is built from one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and initialisation of a transformer language model.

    ``padded_vocab_size`` is the embedding's row count: ``vocab_size`` (the tokenizer's) padded
    to a multiple of ``--make-vocab-size-divisible-by`` x the model-parallel size, so that every
    model-parallel rank holds an equal slice. The loss and sampling ignore the padding rows.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    max_position_embeddings: int
    vocab_size: int
    padded_vocab_size: int
    hidden_dropout: float = 0.1  # on the embeddings and the outputs of attention and MLP
    attention_dropout: float = 0.1  # on the attention probabilities
    init_method_std: float = 0.02
    checkpoint_activations: bool = False  # recompute each group of layers in backward
    checkpoint_num_layers: int = 1  # layers per recomputed group

    def shape(self) -> dict[str, int]:
        """What a checkpoint's tensors depend on (independent of the parallel layout)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "padded_vocab_size": self.padded_vocab_size,
        }
