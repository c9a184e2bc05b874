"""The model's key/value cache and batched generation.

Cached decoding equals the uncached forward at every position (model-parallel sizes 1 and 2);
a left-padded batch decodes each prompt exactly as alone (greedy), samples each prompt's text
from its own seed whatever the batch size, and produces no NaN.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distributed import run_distributed

from megatron import mpu
from megatron.inference import (
    DecodingBatch,
    SamplingSettings,
    StoppingRule,
    generate,
    prompt_generator,
)
from megatron.model import (
    ActivationCheckpointing,
    GPT2Model,
    KVCache,
    default_activation_checkpointing,
    use_activation_checkpointing,
)
from megatron.model.bert_modeling import BertConfig, BertModel

VOCAB, PADDED_VOCAB = 60, 64
CONFIG = dict(num_layers=2, vocab_size=PADDED_VOCAB, hidden_size=32, num_attention_heads=4,
              max_sequence_length=32)
GREEDY = SamplingSettings(greedy=True)
# Prompts of different lengths (1 to 9 tokens), so a batch of them is left-padded.
CONTEXTS = [torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(length)).tolist()
            for length in (5, 1, 9, 3, 7, 2, 8, 4)]


def _build(seed: int, parallel_output: bool = False) -> GPT2Model:
    """An evaluation-mode model (dropout configured, so eval mode must switch it off); a large
    init std gives varied greedy continuations rather than one repeated token."""
    torch.manual_seed(seed)
    model = GPT2Model(embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1,
                      checkpoint_activations=False, parallel_output=parallel_output, init_method_std=0.3,
                      **CONFIG)
    return model.eval()


def _cached_in_chunks(model: GPT2Model, tokens: torch.Tensor, chunks: list[int], explicit_mask: bool) -> torch.Tensor:
    """Logits of ``tokens`` fed through one cache ``chunks[i]`` positions at a time."""
    cache, pieces, start = KVCache.empty(len(model.transformer.layers)), [], 0
    for size in chunks:
        mask = None
        if explicit_mask:  # (b, 1, new, total) booleans, True where a new position may attend
            mask = torch.ones(size, start + size, dtype=torch.bool).tril(diagonal=start)[None, None]
        pieces.append(model(tokens[:, start:start + size], attention_mask=mask, kv_cache=cache))
        start += size
    assert cache.length == tokens.size(1)
    return torch.cat(pieces, dim=1)


def _check_cache_equals_full_forward(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=3)
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(model(tokens, last_logits_only=True), full[:, -1:], atol=1e-6, rtol=1e-6)
        for chunks, explicit_mask in (([1] * 24, False), ([5, 1, 7, 3, 8], False), ([6, 1, 9, 8], True)):
            cached = _cached_in_chunks(model, tokens, chunks, explicit_mask)
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5, msg=lambda m, c=chunks: f"{c}: {m}")


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_forward_equals_full_forward(world_size: int) -> None:
    run_distributed(_check_cache_equals_full_forward, world_size)


def _generate_in_batches(model: GPT2Model, batch_size: int, settings: SamplingSettings, seed: int,
                         stopping: StoppingRule) -> list[list[int]]:
    outputs = []
    for start in range(0, len(CONTEXTS), batch_size):
        contexts = CONTEXTS[start:start + batch_size]
        generators = [prompt_generator(seed, start + i) for i in range(len(contexts))]
        outputs += generate(model, contexts, settings, stopping, VOCAB, generators)
    return outputs


def _check_batched_greedy_equals_one_at_a_time(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=4, parallel_output=True)  # as load_inference_model builds it
    # Token 41 (as eod) ends two rows early (they leave the batch); the others stop at 20 tokens.
    stopping = StoppingRule(eod=41, max_length=20)
    alone = _generate_in_batches(model, 1, GREEDY, 0, stopping)
    assert sum(len(set(tokens)) for tokens in alone) > 3 * len(alone)  # varied: the comparison is not vacuous
    assert any(len(c) + len(t) < 20 for c, t in zip(CONTEXTS, alone))  # some row stopped at eod
    for batch_size in (4, 8):
        assert _generate_in_batches(model, batch_size, GREEDY, 0, stopping) == alone, batch_size


@pytest.mark.parametrize("world_size", [1, 2])
def test_batched_greedy_equals_one_at_a_time(world_size: int) -> None:
    run_distributed(_check_batched_greedy_equals_one_at_a_time, world_size)


def _check_sampling_depends_on_seed_not_batch(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=6, parallel_output=True)
    stopping = StoppingRule(eod=0, max_length=24)
    for settings in (SamplingSettings(temperature=0.9, top_k=20), SamplingSettings(top_p=0.9)):
        alone = _generate_in_batches(model, 1, settings, 7, stopping)
        assert _generate_in_batches(model, 4, settings, 7, stopping) == alone
        assert _generate_in_batches(model, 8, settings, 8, stopping) != alone


def test_sampling_depends_on_seed_not_batch_size() -> None:
    run_distributed(_check_sampling_depends_on_seed_not_batch, 1)


def _check_left_padding_gives_no_nan(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=8)
    batch = DecodingBatch(CONTEXTS, pad=0, capacity=9, device=torch.device("cpu"))
    assert batch.prompt_tokens.shape == (len(CONTEXTS), 9) and batch.padded
    with torch.no_grad():
        logits = model(batch.prompt_tokens, batch.prompt_positions, batch.prompt_mask(), kv_cache=KVCache.empty(2))
        assert torch.isfinite(logits).all()  # pad positions included
        for row, context in enumerate(CONTEXTS):
            alone = model(torch.tensor([context]))[0]
            torch.testing.assert_close(logits[row, -len(context):], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_has_no_nan_and_matches_unpadded() -> None:
    run_distributed(_check_left_padding_gives_no_nan, 1)


def _check_cache_limits(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=9)
    cache = KVCache.empty(2, capacity=4)
    with torch.no_grad():
        model(torch.zeros(2, 30, dtype=torch.long), kv_cache=cache)  # beyond the reserved 4: grows
        with pytest.raises(ValueError, match=r"30 cached \+ 3 new positions exceed max_sequence_length \(32\)"):
            model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KVCache.empty\\(2\\)"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=KVCache.empty(3))


def test_cache_grows_and_rejects_positions_past_the_maximum() -> None:
    run_distributed(_check_cache_limits, 1)


def _check_injected_checkpointing(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    functions = ActivationCheckpointing(checkpoint=mpu.checkpoint, rng_tracker=mpu.CudaRNGStatesTracker())
    for model in (_build(seed=1), BertModel(BertConfig(num_layers=2, vocab_size=64, hidden_size=32,
                                                       num_attention_heads=4, max_sequence_length=16))):
        holders = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
        assert len(holders) == 3  # the layer stack and each layer's attention
        assert all(m.activation_checkpointing == default_activation_checkpointing() for m in holders)
        use_activation_checkpointing(model, functions)
        assert all(m.activation_checkpointing is functions for m in holders)
        # A copied model keeps drawing from the same tracker (the one checkpoints save).
        copied = copy.deepcopy(model)
        assert all(m.activation_checkpointing is functions for m in copied.modules()
                   if hasattr(m, "activation_checkpointing"))


def test_use_activation_checkpointing_reaches_every_holder() -> None:
    run_distributed(_check_injected_checkpointing, 1)
