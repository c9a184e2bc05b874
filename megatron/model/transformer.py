"""GPT-2 transformer blocks built from the tensor-parallel layers.

Shapes: b = micro batch, s = sequence, h = hidden, np = heads on this rank, hn = h / heads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron import mpu

from .cpu_attention import causal_attention_with_dropout
from .dropout import Dropout
from .kv_cache import KVCache, LayerKVCache

InitMethod = Callable[[torch.Tensor], torch.Tensor]
LAYERNORM_EPSILON = 1e-5


@dataclass(frozen=True)
class ActivationCheckpointing:
    """The checkpoint function a model recomputes activations with, and the RNG tracker its
    model-parallel dropout draws from (the one that function replays).

    The two come as a pair: a checkpoint function restores the states of its own tracker only, so
    dropout drawn from another tracker would differ between forward and recomputation.
    """

    checkpoint: Callable[..., Any]  # called as checkpoint(function, *tensor_args), like mpu.checkpoint
    rng_tracker: Any  # has fork(), get_states(), set_states(), like mpu.get_cuda_rng_tracker()

    def __deepcopy__(self, memo: dict) -> ActivationCheckpointing:
        # The tracker is the process's one model-parallel generator (saved in checkpoints): a copied
        # model must draw from it too, not from a private copy.
        return self


def default_activation_checkpointing() -> ActivationCheckpointing:
    """``mpu.checkpoint`` and ``mpu.get_cuda_rng_tracker()``: what every module holds when built."""
    return ActivationCheckpointing(mpu.checkpoint, mpu.get_cuda_rng_tracker())


def use_activation_checkpointing(model: nn.Module, functions: ActivationCheckpointing) -> None:
    """Hand ``functions`` to every submodule of ``model`` that checkpoints or draws model-parallel
    dropout (those holding an ``activation_checkpointing`` attribute), e.g. DeepSpeed's pair."""
    for module in model.modules():
        if isinstance(getattr(module, "activation_checkpointing", None), ActivationCheckpointing):
            module.activation_checkpointing = functions


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


def _sdpa_mask(attention_mask: torch.Tensor | None, new: int, past: int,
               device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``new`` queries after ``past`` cached keys.

    A given mask (ones/True where a query may attend) is used as it is. Otherwise attention is
    causal: query ``i`` sits at absolute position ``past + i`` and sees keys ``0 .. past + i``.
    """
    if attention_mask is not None:
        return attention_mask.to(torch.bool), False
    if past == 0:
        return None, True  # SDPA's own causal path, exactly as without a cache
    if new == 1:
        return None, False  # one new position sees every key
    return torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past), False


class ParallelSelfAttention(nn.Module):
    """Causal multi-head self-attention with heads split across model-parallel ranks.

    ``forward(hidden_states (b, s, h), attention_mask, kv_cache)``: ``attention_mask`` is None
    (causal) or booleans/ones where a query may attend, ``(b or 1, 1, s, past + s)``. With a
    ``kv_cache`` (``LayerKVCache`` holding ``past`` positions) the ``s`` new positions attend to
    the cached keys and their own, and are appended to the cache.
    """

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
        self.output_dropout = Dropout(output_dropout_prob)
        self.activation_checkpointing = default_activation_checkpointing()

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        b, s, _ = tensor.shape
        tensor = tensor.view(b, s, self.num_attention_heads_per_partition, self.hidden_size_per_attention_head)
        return tensor.transpose(1, 2)  # (b, np, s, hn)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        mixed = self.query_key_value(hidden_states)  # (b, s, 3 h / mp)
        query, key, value = (self._split_heads(t) for t in mpu.split_tensor_along_last_dim(mixed, 3))
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            key, value = kv_cache.append(key, value)  # (b, np, past + s, hn)
        mask, is_causal = _sdpa_mask(attention_mask, query.size(2), past, query.device)
        dropout_p = self.attention_dropout_prob if self.training else 0.0
        if dropout_p == 0.0:
            # Nothing is drawn: skip swapping generator states (per layer, per decoded token).
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal)
        else:
            # The probabilities belong to this rank's heads: draw their dropout from the mp generator.
            with self.activation_checkpointing.rng_tracker.fork():
                if query.device.type == "cpu" and is_causal:
                    context = causal_attention_with_dropout(query, key, value, dropout_p)
                else:
                    context = F.scaled_dot_product_attention(
                        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
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
        self.dropout = Dropout(output_dropout_prob)

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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        attention = self.attention(self.input_layernorm(hidden_states), attention_mask, kv_cache)
        hidden_states = hidden_states + attention
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
    in backward through ``activation_checkpointing.checkpoint`` (``mpu.checkpoint`` unless
    ``use_activation_checkpointing`` hands in another, e.g. DeepSpeed's). With a ``kv_cache``
    (inference) layer ``i`` reads and extends ``kv_cache.layers[i]``; nothing is recomputed.
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
        self.activation_checkpointing = default_activation_checkpointing()

    def _run_layers(self, start: int, end: int) -> Callable[..., torch.Tensor]:
        def run(hidden_states: torch.Tensor, *attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask[0] if attention_mask else None
            for layer in self.layers[start:end]:
                hidden_states = layer(hidden_states, mask)
            return hidden_states

        return run

    def _run_cached(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                    kv_cache: KVCache) -> torch.Tensor:
        if len(kv_cache.layers) != len(self.layers):
            raise ValueError(f"the KV cache has {len(kv_cache.layers)} layers but the model {len(self.layers)}: "
                             f"build it with KVCache.empty({len(self.layers)})")
        for layer, layer_cache in zip(self.layers, kv_cache.layers):
            hidden_states = layer(hidden_states, attention_mask, layer_cache)
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        # A None mask is left out of the arguments: checkpoint functions save tensors only.
        mask_args = () if attention_mask is None else (attention_mask,)
        if kv_cache is not None:
            hidden_states = self._run_cached(hidden_states, attention_mask, kv_cache)
        elif self.checkpoint_activations and self.training and torch.is_grad_enabled():
            checkpoint = self.activation_checkpointing.checkpoint
            for start in range(0, len(self.layers), self.checkpoint_num_layers):
                end = min(start + self.checkpoint_num_layers, len(self.layers))
                hidden_states = checkpoint(self._run_layers(start, end), hidden_states, *mask_args)
        else:
            hidden_states = self._run_layers(0, len(self.layers))(hidden_states, *mask_args)
        return self.final_layernorm(hidden_states)
