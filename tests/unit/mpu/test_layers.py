"""Every tensor-parallel layer equals its serial torch counterpart (gloo, 2 and 4 ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from megatron import mpu

TOL = 1e-6  # absolute and relative: fp32 sums in another order differ in the last bits


def _init(mp_size: int, seed: int = 1234) -> None:
    mpu.initialize_model_parallel(mp_size)
    torch.manual_seed(seed)


def _full(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).float()


def _shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    size, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    return torch.chunk(full, size, dim=dim)[rank]


def _check_column(rank: int, world_size: int, gather_output: bool) -> None:
    _init(world_size)
    batch, seq, in_size, out_size = 3, 5, 8, 12
    layer = mpu.ColumnParallelLinear(in_size, out_size, gather_output=gather_output)
    weight, bias = _full((out_size, in_size), 1), _full((out_size,), 2)
    with torch.no_grad():
        layer.weight.copy_(_shard(weight, 0))
        layer.bias.copy_(_shard(bias, 0))
    x = _full((batch, seq, in_size), 3).requires_grad_()
    grad_out = _full((batch, seq, out_size), 4)
    out = layer(x)
    out.backward(grad_out if gather_output else _shard(grad_out, -1))

    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ref_out = F.linear(ref_x, ref_w, ref_b)
    ref_out.backward(grad_out)
    expected = ref_out if gather_output else _shard(ref_out, -1)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(ref_w.grad, 0), atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.bias.grad, _shard(ref_b.grad, 0), atol=TOL, rtol=TOL)


def _check_row(rank: int, world_size: int, input_is_parallel: bool) -> None:
    _init(world_size)
    batch, seq, in_size, out_size = 3, 5, 12, 7
    layer = mpu.RowParallelLinear(in_size, out_size, input_is_parallel=input_is_parallel)
    weight, bias = _full((out_size, in_size), 1), _full((out_size,), 2)
    with torch.no_grad():
        layer.weight.copy_(_shard(weight, 1))
        layer.bias.copy_(bias)
    x_full = _full((batch, seq, in_size), 3)
    x = (_shard(x_full, -1) if input_is_parallel else x_full).clone().requires_grad_()
    grad_out = _full((batch, seq, out_size), 4)
    out = layer(x)
    out.backward(grad_out)

    ref_w, ref_b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref_x = x_full.clone().requires_grad_()
    ref_out = F.linear(ref_x, ref_w, ref_b)
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    expected_x_grad = _shard(ref_x.grad, -1) if input_is_parallel else ref_x.grad
    torch.testing.assert_close(x.grad, expected_x_grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(ref_w.grad, 1), atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.bias.grad, ref_b.grad, atol=TOL, rtol=TOL)


def _check_embedding(rank: int, world_size: int) -> None:
    _init(world_size)
    vocab, hidden = 16, 6
    layer = mpu.VocabParallelEmbedding(vocab, hidden)
    weight = _full((vocab, hidden), 1)
    with torch.no_grad():
        layer.weight.copy_(_shard(weight, 0))
    ids = torch.randint(0, vocab, (4, 7), generator=torch.Generator().manual_seed(5))
    grad_out = _full((4, 7, hidden), 2)
    out = layer(ids)
    out.backward(grad_out)
    ref_w = weight.clone().requires_grad_()
    ref_out = F.embedding(ids, ref_w)
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(ref_w.grad, 0), atol=TOL, rtol=TOL)
    for bad in (vocab, -1, vocab + 100):
        with pytest.raises(RuntimeError, match=f"outside the \\(padded\\) vocabulary of {vocab}"):
            layer(torch.tensor([[0, bad]]))


def _check_init_independent_of_mp(rank: int, world_size: int) -> None:
    """Shards drawn at size k are slices of the weights drawn at size 1 (same seed)."""
    _init(world_size, seed=7)
    column = mpu.ColumnParallelLinear(4, 12, init_method=torch.nn.init.normal_, stride=3)
    row = mpu.RowParallelLinear(12, 4, init_method=torch.nn.init.normal_)
    embedding = mpu.VocabParallelEmbedding(8, 4, init_method=torch.nn.init.normal_)
    torch.manual_seed(7)
    full_column, full_row, full_embedding = torch.randn(12, 4), torch.randn(4, 12), torch.randn(8, 4)
    expected_column = mpu.partition_master_weight(full_column, 0, world_size, rank, stride=3)
    torch.testing.assert_close(column.weight.data, expected_column, atol=0, rtol=0)
    torch.testing.assert_close(row.weight.data, _shard(full_row, 1), atol=0, rtol=0)
    torch.testing.assert_close(embedding.weight.data, _shard(full_embedding, 0), atol=0, rtol=0)


def _check_mappings(rank: int, world_size: int) -> None:
    _init(world_size)
    x = _full((2, 4 * world_size), 1).requires_grad_()
    gathered = mpu.gather_from_model_parallel_region(mpu.scatter_to_model_parallel_region(x))
    torch.testing.assert_close(gathered, x)
    gathered.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    y = torch.full((3,), float(rank + 1), requires_grad=True)
    reduced = mpu.reduce_from_model_parallel_region(y)
    assert torch.allclose(reduced, torch.full((3,), float(sum(range(1, world_size + 1)))))
    copied = mpu.copy_to_model_parallel_region(y)
    copied.backward(torch.ones(3))
    torch.testing.assert_close(y.grad, torch.full((3,), float(world_size)))


def _check_groups(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(2)
    assert mpu.get_model_parallel_world_size() == 2
    assert mpu.get_data_parallel_world_size() == world_size // 2
    assert mpu.get_model_parallel_rank() == rank % 2
    assert mpu.get_data_parallel_rank() == rank // 2
    assert mpu.get_model_parallel_src_rank() == rank - rank % 2
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    assert value.item() == sum(r for r in range(world_size) if r % 2 == rank % 2)


def _check_bad_world_size(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match=r"world size \(2\) is not divisible by --model-parallel-size \(3\)"):
        mpu.initialize_model_parallel(3)


def _check_broadcast(rank: int, world_size: int) -> None:
    _init(2)
    data = None
    if mpu.get_model_parallel_rank() == 0:
        data = {"text": torch.arange(12).view(3, 4) + rank, "other": torch.arange(5)}
    out = mpu.broadcast_data(["text", "other"], data, torch.int64)
    src = mpu.get_model_parallel_src_rank()
    torch.testing.assert_close(out["text"], torch.arange(12).view(3, 4) + src)
    torch.testing.assert_close(out["other"], torch.arange(5))


def _run_checks(rank: int, world_size: int, checks: list) -> None:
    """Several checks in one spawn: process start-up dominates the cost of these tests."""
    for check, *args in checks:
        check(rank, world_size, *args)
        mpu.destroy_model_parallel()


LAYER_CHECKS = [
    (_check_column, True),
    (_check_column, False),
    (_check_row, True),
    (_check_row, False),
    (_check_embedding,),
    (_check_init_independent_of_mp,),
    (_check_mappings,),
]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_parallel_layers_equal_serial(world_size: int) -> None:
    run_distributed(_run_checks, world_size, LAYER_CHECKS)


def test_groups_layout_and_broadcast() -> None:
    run_distributed(_run_checks, 4, [(_check_groups,), (_check_broadcast,)])


def test_world_size_not_divisible() -> None:
    run_distributed(_check_bad_world_size, 2)
