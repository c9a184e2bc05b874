"""GPT-2 transformer blocks built from the tensor-parallel layers.

Shapes: b = micro batch, s = sequence, h = hidden, np = heads on this rank, hn = h / heads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu

InitMethod = Callable[[torch.Tensor], torch.Tensor]
LAYERNORM_EPSILON = 1e-5


def draw_init_seed() -> int:
    """One draw from the default generator (seeded identically on every rank)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Initialise under a CPU generator seeded with ``seed``, leaving the default stream untouched.

    Each block of the model draws its weights from its own seed, so a block's initial weights do
    not depend on which other blocks this rank builds: a pipeline stage builds a subset of them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_method_normal(std: float) -> InitMethod:
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method(std: float, num_layers: int) -> InitMethod:
    """GPT-2's init for projections into the residual stream: std / sqrt(2 * num_layers)."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


class ParallelSelfAttention(nn.Module):
    """Causal multi-head self-attention with heads split across model-parallel ranks."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        attention_dropout_prob: float,
        output_dropout_prob: float,
        init_method: InitMethod,
        output_layer_init_method: InitMethod,
    ) -> None:
        super().__init__()
        world_size = mpu.get_model_parallel_world_size()
        self.hidden_size_per_partition = mpu.divide(hidden_size, world_size)
        self.hidden_size_per_attention_head = mpu.divide(hidden_size, num_attention_heads)
        self.num_attention_heads_per_partition = mpu.divide(num_attention_heads, world_size)
        self.attention_dropout_prob = attention_dropout_prob
        # stride 3: each rank keeps the q, k and v rows of its own heads.
        self.query_key_value = mpu.ColumnParallelLinear(
            hidden_size, 3 * hidden_size, gather_output=False, init_method=init_method, stride=3
        )
        self.dense = mpu.RowParallelLinear(
            hidden_size, hidden_size, input_is_parallel=True, init_method=output_layer_init_method
        )
        self.output_dropout = nn.Dropout(output_dropout_prob)

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        b, s, _ = tensor.shape
        tensor = tensor.view(b, s, self.num_attention_heads_per_partition, self.hidden_size_per_attention_head)
        return tensor.transpose(1, 2)  # (b, np, s, hn)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mixed = self.query_key_value(hidden_states)  # (b, s, 3 h / mp)
        query, key, value = (self._split_heads(t) for t in mpu.split_tensor_along_last_dim(mixed, 3))
        dropout_p = self.attention_dropout_prob if self.training else 0.0
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        # The probabilities belong to this rank's heads: draw their dropout from the mp generator.
        with mpu.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None
            )  # (b, np, s, hn)
        b, _, s, _ = context.shape
        context = context.transpose(1, 2).reshape(b, s, self.hidden_size_per_partition)
        return self.output_dropout(self.dense(context))


class ParallelMLP(nn.Module):
    """h -> 4h (column parallel) -> tanh GELU -> 4h -> h (row parallel) -> dropout."""

    def __init__(
        self,
        hidden_size: int,
        output_dropout_prob: float,
        init_method: InitMethod,
        output_layer_init_method: InitMethod,
    ) -> None:
        super().__init__()
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            hidden_size, 4 * hidden_size, gather_output=False, init_method=init_method
        )
        self.dense_4h_to_h = mpu.RowParallelLinear(
            4 * hidden_size, hidden_size, input_is_parallel=True, init_method=output_layer_init_method
        )
        self.dropout = nn.Dropout(output_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate = F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh")
        return self.dropout(self.dense_4h_to_h(intermediate))


class ParallelTransformerLayer(nn.Module):
    """Pre-LayerNorm GPT-2 block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        attention_dropout_prob: float,
        output_dropout_prob: float,
        init_method: InitMethod,
        output_layer_init_method: InitMethod,
    ) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPSILON)
        self.attention = ParallelSelfAttention(
            hidden_size, num_attention_heads, attention_dropout_prob, output_dropout_prob,
            init_method, output_layer_init_method,
        )
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPSILON)
        self.mlp = ParallelMLP(hidden_size, output_dropout_prob, init_method, output_layer_init_method)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.input_layernorm(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def build_gpt2_embeddings(vocab_size: int, hidden_size: int, max_sequence_length: int, init_method_std: float,
                          init_seed: int) -> tuple[mpu.VocabParallelEmbedding, nn.Embedding]:
    """GPT-2's token and position embeddings, initialised from seed ``init_seed`` (block 0).

    ``GPT2Model`` and the pipeline's first stage both build them here, so a pipelined model starts
    from the unpipelined one's weights.
    """
    with seeded_init(init_seed):
        init_method = init_method_normal(init_method_std)
        word_embeddings = mpu.VocabParallelEmbedding(vocab_size, hidden_size, init_method=init_method)
        position_embeddings = nn.Embedding(max_sequence_length, hidden_size)
        init_method(position_embeddings.weight)
    return word_embeddings, position_embeddings


def compile_transformer_layers(module: nn.Module) -> int:
    """``--compile``: ``torch.compile`` every ``ParallelTransformerLayer`` inside ``module``, in place.

    Compiling in place keeps parameter names (checkpoints are interchangeable with eager runs).
    Dropout falls back to eager random kernels, so a compiled run draws the same masks from the
    same generators as an eager one: model-parallel RNG tracking, activation recomputation and
    exact resume behave as without ``--compile``. Returns the number of layers compiled.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    layers = [submodule for submodule in module.modules() if isinstance(submodule, ParallelTransformerLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def build_transformer_layer(index: int, num_layers: int, hidden_size: int, num_attention_heads: int,
                            attention_dropout_prob: float, output_dropout_prob: float, init_method_std: float,
                            init_seed: int) -> ParallelTransformerLayer:
    """Layer ``index`` (0-based) initialised from seed ``init_seed + 1 + index`` (0 is the embedding's)."""
    with seeded_init(init_seed + 1 + index):
        return ParallelTransformerLayer(
            hidden_size, num_attention_heads, attention_dropout_prob, output_dropout_prob,
            init_method_normal(init_method_std), scaled_init_method(init_method_std, num_layers))


class ParallelTransformer(nn.Module):
    """A stack of ``ParallelTransformerLayer`` and the final LayerNorm.

    With ``checkpoint_activations`` each group of ``checkpoint_num_layers`` layers is recomputed
    in backward through ``mpu.checkpoint`` (looked up at call time, so DeepSpeed's activation
    checkpointing can replace it).
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_attention_heads: int,
        attention_dropout_prob: float,
        output_dropout_prob: float,
        checkpoint_activations: bool,
        checkpoint_num_layers: int = 1,
        init_method_std: float = 0.02,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_num_layers = checkpoint_num_layers
        init_seed = draw_init_seed() if init_seed is None else init_seed
        self.layers = nn.ModuleList(
            build_transformer_layer(index, num_layers, hidden_size, num_attention_heads, attention_dropout_prob,
                                    output_dropout_prob, init_method_std, init_seed)
            for index in range(num_layers)
        )
        self.final_layernorm = nn.LayerNorm(hidden_size, eps=LAYERNORM_EPSILON)

    def _run_layers(self, start: int, end: int) -> Callable[..., torch.Tensor]:
        def run(hidden_states: torch.Tensor, *attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask[0] if attention_mask else None
            for layer in self.layers[start:end]:
                hidden_states = layer(hidden_states, mask)
            return hidden_states

        return run

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # A None mask is left out of the arguments: checkpoint functions save tensors only.
        mask_args = () if attention_mask is None else (attention_mask,)
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            for start in range(0, len(self.layers), self.checkpoint_num_layers):
                end = min(start + self.checkpoint_num_layers, len(self.layers))
                hidden_states = mpu.checkpoint(self._run_layers(start, end), hidden_states, *mask_args)
        else:
            hidden_states = self._run_layers(0, len(self.layers))(hidden_states, *mask_args)
        return self.final_layernorm(hidden_states)
