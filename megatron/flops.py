"""Training FLOPs of GPT-2, one formula for logs and benchmarks.

Model FLOPs per token = 6 N + 12 L h s, with N = 12 L h^2 + V h the parameters that enter
matrix multiplies (the transformer weights and the tied output/embedding matrix; biases,
LayerNorm and position embeddings are negligible and left out). 6 N counts forward (2 N) and
backward (4 N); 12 L h s counts the attention scores and the weighted sum (QK^T and AV, 2 L h s
each forward, times 3). This is what Megatron-LM's 72 B s L h^2 (1 + s/6h + V/12Lh), PaLM's
and nanoGPT's estimates reduce to for GPT-2. Hardware FLOPs add one more forward of the
recomputed transformer layers under activation checkpointing: 24 L h^2 + 4 L h s per token.
"""

from __future__ import annotations


def matmul_params(num_layers: int, hidden_size: int, vocab_size: int) -> int:
    return 12 * num_layers * hidden_size**2 + vocab_size * hidden_size


def model_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, vocab_size: int) -> int:
    return 6 * matmul_params(num_layers, hidden_size, vocab_size) + 12 * num_layers * hidden_size * seq_length


def hardware_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, vocab_size: int,
                             checkpoint_activations: bool) -> int:
    flops = model_flops_per_token(num_layers, hidden_size, seq_length, vocab_size)
    if checkpoint_activations:
        flops += 24 * num_layers * hidden_size**2 + 4 * num_layers * hidden_size * seq_length
    return flops
