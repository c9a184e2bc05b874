"""The CPU dropout (32-bit integer masks, 16-bit in half precision) and the causal attention with dropout built on it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model.cpu_attention import (
    _BlockedCausalAttention,
    _plain,
    causal_attention_with_dropout,
)
from megatron.model.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("bits", [32, 16])
def test_keep_mask_keeps_the_asked_fraction_in_every_lane_of_each_draw(bits: int) -> None:
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), 0.9, torch.device("cpu"), bits=bits).float()
    lanes = 64 // bits  # the 32- or 16-bit parts of each int64 drawn
    sigma = math.sqrt(0.9 * 0.1 / (1e6 / lanes))
    for lane in range(lanes):
        assert abs(mask.view(-1)[lane::lanes].mean().item() - 0.9) < 5 * sigma


def test_half_precision_dropout_draws_16_bits_per_element() -> None:
    """A quarter of an int64 draw per element: half the generator's work of a 32-bit mask, with the
    drop probability rounded to 2**-16 (the bf16 scale itself is rounded to 2**-8)."""
    x = torch.ones(8, 16, dtype=torch.bfloat16)
    torch.manual_seed(2)
    out = dropout(x, 0.1)
    after = torch.get_rng_state()
    torch.manual_seed(2)
    keep = keep_mask(x.shape, 0.9, x.device, bits=16)
    assert torch.equal(out != 0, keep) and torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(2)
    torch.randint(-(2**63), 2**63 - 1, (32,), dtype=torch.int64)  # 128 elements / 4 per draw
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6])
def test_a_dropout_probability_near_0_or_1_keeps_32_bits_in_half_precision(p: float) -> None:
    """16 bits cannot drop fewer than one element in 2**16: p = 1e-6 would drop 15 times too many."""
    x = torch.ones(1000, 1000, dtype=torch.bfloat16)
    torch.manual_seed(6)
    kept = (dropout(x, p) != 0).sum().item()
    torch.manual_seed(6)
    assert kept == keep_mask(x.shape, 1.0 - p, x.device, bits=32).sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_what_it_keeps_and_its_gradient_is_the_mask(dtype: torch.dtype) -> None:
    x = (torch.rand(64, 33) + 1.0).to(dtype).requires_grad_()
    torch.manual_seed(3)
    out = dropout(x, 0.25)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, 0.75, x.device, bits=32 if dtype == torch.float32 else 16)
    expected = torch.where(keep, x.detach() * torch.tensor(1 / 0.75, dtype=dtype), torch.zeros((), dtype=dtype))
    assert out.dtype == dtype and torch.equal(out, expected)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.where(keep, torch.tensor(1 / 0.75, dtype=dtype), torch.zeros((), dtype=dtype)))


def test_dropout_is_the_identity_when_off_and_draws_nothing() -> None:
    x = torch.randn(5, 7)
    state = torch.get_rng_state()
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert torch.equal(torch.get_rng_state(), state)
    assert not dropout(x, 1.0).any()


@pytest.mark.parametrize("attention", [_BlockedCausalAttention.apply, _plain], ids=["blocked", "plain"])
@pytest.mark.parametrize("seq", [10, 9])  # an odd s * s draws the blocked mask at once
def test_causal_attention_with_dropout_is_softmax_dropout_values(attention, seq: int) -> None:
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 3, seq, 4, generator=gen, dtype=torch.float64).requires_grad_()
                         for _ in range(3))
    torch.manual_seed(7)
    context = attention(query, key, value, 0.2)
    grads = torch.autograd.grad(context.square().sum(), (query, key, value))

    torch.manual_seed(7)
    keep = keep_mask((6, seq, seq), 0.8, query.device).view(2, 3, seq, seq)
    scores = query @ key.transpose(-1, -2) / 2.0
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    expected = (torch.softmax(scores, dim=-1) * keep / 0.8) @ value
    torch.testing.assert_close(context, expected)
    for ours, reference in zip(grads, torch.autograd.grad(expected.square().sum(), (query, key, value))):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("seq", [12, 9])  # 9 * 9 splits into no whole draws: the mask is drawn at once
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_attention_equals_the_plain_formulation(dtype: torch.dtype, seq: int) -> None:
    """What eager runs compute equals what compiled runs trace: same masks, same values."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, seq, 3, 3, 8, generator=gen).to(dtype)  # (b, s, q/k/v, heads, hn), as the model splits
    results = []
    for attention in (_BlockedCausalAttention.apply, _plain):
        leaf = qkv.clone().requires_grad_()
        query, key, value = (leaf[:, :, index].transpose(1, 2) for index in range(3))
        torch.manual_seed(5)
        context = attention(query, key, value, 0.1)
        context.float().square().sum().backward()
        results.append((context.detach(), leaf.grad))
    (blocked, blocked_grad), (plain, plain_grad) = results
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(blocked, plain, **tolerance)
    torch.testing.assert_close(blocked_grad, plain_grad, **tolerance)


def test_causal_attention_without_dropout_draws_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(2, 3, 10, 4, generator=gen) for _ in range(3))
    keep_everything = 2.0**-40  # below the mask's resolution: every element kept, scaled by ~1
    torch.testing.assert_close(causal_attention_with_dropout(query, key, value, keep_everything),
                               F.scaled_dot_product_attention(query, key, value, is_causal=True))
