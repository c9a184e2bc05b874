"""Vocab-parallel cross-entropy, the model-parallel RNG tracker and gradient clipping."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from megatron import mpu


def _full(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


def _check_cross_entropy(rank: int, world_size: int, vocab: int, padded_vocab: int) -> None:
    mpu.initialize_model_parallel(world_size)
    logits = _full((3, 5, padded_vocab), 1, scale=4.0)
    target = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(2))
    shard = torch.chunk(logits, world_size, dim=-1)[rank].clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(shard, target, vocab_size=vocab if vocab < padded_vocab else None)
    weights = _full((3, 5), 3)
    (loss * weights).sum().backward()

    ref_logits = logits[..., :vocab].clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.view(-1, vocab), target.view(-1), reduction="none").view(3, 5)
    (ref_loss * weights).sum().backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    ref_grad = torch.zeros_like(logits)
    ref_grad[..., :vocab] = ref_logits.grad
    expected = torch.chunk(ref_grad, world_size, dim=-1)[rank]
    torch.testing.assert_close(shard.grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("vocab,padded_vocab", [(64, 64), (50, 64)])
def test_vocab_parallel_cross_entropy(world_size: int, vocab: int, padded_vocab: int) -> None:
    run_distributed(_check_cross_entropy, world_size, vocab, padded_vocab)


def _gather_mp(tensor: torch.Tensor) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(mpu.get_model_parallel_world_size())]
    dist.all_gather(pieces, tensor, group=mpu.get_model_parallel_group())
    return pieces


def _gather_dp(tensor: torch.Tensor) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(mpu.get_data_parallel_world_size())]
    dist.all_gather(pieces, tensor, group=mpu.get_data_parallel_group())
    return pieces


def _check_dropout_rng(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(2)
    mpu.model_parallel_cuda_manual_seed(1234)
    ones = torch.ones(4096)
    outside = F.dropout(ones, 0.5, training=True)
    with mpu.get_cuda_rng_tracker().fork():
        inside = F.dropout(ones, 0.5, training=True)
    outside_mp, inside_mp = _gather_mp(outside), _gather_mp(inside)
    assert torch.equal(outside_mp[0], outside_mp[1]), "replicated dropout must agree across mp ranks"
    assert not torch.equal(inside_mp[0], inside_mp[1]), "parallel-region dropout must differ across mp ranks"
    for pieces in (_gather_dp(outside), _gather_dp(inside)):
        assert all(torch.equal(pieces[0], p) for p in pieces), "masks must agree across dp replicas"
    # The tracker's state advanced while the default generator did not see the forked draw.
    mpu.model_parallel_cuda_manual_seed(1234)
    assert torch.equal(F.dropout(ones, 0.5, training=True), outside)


def test_dropout_masks_follow_model_parallel_layout() -> None:
    run_distributed(_check_dropout_rng, 4)


def _check_checkpoint_replays_rng(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    weight = _full((16, 16), 1)

    def block(x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x @ weight, 0.3, training=True)
        with mpu.get_cuda_rng_tracker().fork():
            return F.dropout(torch.tanh(x), 0.3, training=True)

    grads = []
    for use_checkpoint in (False, True):
        mpu.model_parallel_cuda_manual_seed(99)
        x = _full((4, 16), 2).requires_grad_()
        y = mpu.checkpoint(block, x) if use_checkpoint else block(x)
        # Draws between forward and backward must not leak into the recomputation.
        torch.rand(100)
        y.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_checkpoint_restores_rng_states() -> None:
    run_distributed(_check_checkpoint_replays_rng, 2)


def _check_clip_grad_norm(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    torch.manual_seed(0)
    column = mpu.ColumnParallelLinear(8, 16, gather_output=False)
    row = mpu.RowParallelLinear(16, 8, input_is_parallel=True)
    layernorm = torch.nn.LayerNorm(8)
    x = _full((4, 8), 3)
    layernorm(row(column(x))).pow(2).sum().backward()
    params = list(column.parameters()) + list(row.parameters()) + list(layernorm.parameters())
    local = [p.grad.clone() for p in params]
    norm = mpu.clip_grad_norm(params, max_norm=0.5)

    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(1)
    torch.manual_seed(0)
    serial = [mpu.ColumnParallelLinear(8, 16), mpu.RowParallelLinear(16, 8), torch.nn.LayerNorm(8)]
    torch.nn.Sequential(*serial)(x).pow(2).sum().backward()
    serial_params = [p for m in serial for p in m.parameters()]
    expected = torch.nn.utils.clip_grad_norm_(serial_params, max_norm=0.5)
    torch.testing.assert_close(norm, expected, atol=1e-6, rtol=1e-6)
    coef = 0.5 / (expected + 1e-6)
    for param, before in zip(params, local):
        torch.testing.assert_close(param.grad, before * coef, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("world_size", [2, 4])
def test_clip_grad_norm_equals_serial(world_size: int) -> None:
    run_distributed(_check_clip_grad_norm, world_size)
