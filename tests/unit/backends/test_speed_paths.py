"""The fast paths of the training step give the reference results.

Chunked vocab-parallel cross-entropy (fp32 and half logits, padding, several chunks, model
parallel), the reused CPU gradient buffer, half outputs of ``FP16_Module``, the ``_foreach``
master-gradient copy and the fused AdamW picked by feature detection.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from torch import nn

from megatron import mpu
from megatron.backends.base import build_optimizer, fused_adamw_available
from megatron.fp16 import FP16_Module, FP16_Optimizer
from megatron.launch import free_port
from megatron.mpu import cross_entropy


@pytest.fixture
def serial_mpu():
    """A one-rank gloo group in this process, as training builds it for one device."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    yield
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def small_chunks(monkeypatch):
    """Three rows per chunk for a 50-column vocabulary: 15 rows take 5 chunks."""
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 3 * 4 * 50)


def _inputs(padded_vocab: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, padded_vocab, generator=gen) * 4).to(dtype)
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    weights = torch.rand(3, 5, generator=gen)
    return logits, target, weights


def _loss_and_grad(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                   vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(leaf, target, vocab_size=vocab)
    (loss * weights).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,padded_vocab", [(50, 50), (50, 64)])
def test_chunked_cross_entropy_equals_torch(serial_mpu, small_chunks, dtype, vocab, padded_vocab) -> None:
    logits, target, weights = _inputs(padded_vocab, vocab, dtype)
    loss, grad = _loss_and_grad(logits, target, weights, vocab)

    reference = logits[..., :vocab].float().requires_grad_()  # half logits widened exactly
    ref_loss = F.cross_entropy(reference.view(-1, vocab), target.view(-1), reduction="none").view(3, 5)
    (ref_loss * weights).sum().backward()
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    expected = torch.zeros(3, 5, padded_vocab)
    expected[..., :vocab] = reference.grad
    torch.testing.assert_close(grad, expected.to(dtype), atol=1e-6, rtol=0)  # one rounding to dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_does_not_change_a_bit(serial_mpu, monkeypatch, dtype) -> None:
    logits, target, weights = _inputs(64, 50, dtype)
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 1 << 30)
    one_chunk = _loss_and_grad(logits, target, weights, 50)
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 4 * 50)  # one row per chunk
    for whole, chunked in zip(one_chunk, _loss_and_grad(logits, target, weights, 50)):
        assert torch.equal(whole, chunked)


def test_reused_gradient_buffer_never_overwrites_a_kept_gradient(serial_mpu) -> None:
    logits, target, weights = _inputs(64, 50, torch.float32)
    first = logits.clone().requires_grad_()
    (mpu.vocab_parallel_cross_entropy(first, target, 50) * weights).sum().backward()
    kept = first.grad.clone()
    for _ in range(2):  # later backwards of the same shape (the buffer is free only when unreferenced)
        _loss_and_grad(logits * 2, target, weights, 50)
    assert torch.equal(first.grad, kept)


def test_reused_gradient_buffer_is_reused_when_free(serial_mpu) -> None:
    logits, target, weights = _inputs(64, 50, torch.float32)
    pointers = []
    for _ in range(3):
        hidden = logits.clone().requires_grad_()
        projected = hidden * 1.0  # non-leaf logits, as in the model: their gradient is not kept
        (mpu.vocab_parallel_cross_entropy(projected, target, 50) * weights).sum().backward()
        pointers.append(cross_entropy._grad_buffers[((3, 5, 64), torch.float32)].data_ptr())
    assert len(set(pointers)) == 1


def _check_chunked_model_parallel(rank: int, world_size: int) -> None:
    cross_entropy.CHUNK_BYTES = 2 * 4 * 32  # several chunks per rank
    mpu.initialize_model_parallel(world_size)
    logits, target, weights = _inputs(64, 50, torch.bfloat16)
    shard = torch.chunk(logits, world_size, dim=-1)[rank]
    loss, grad = _loss_and_grad(shard, target, weights, 50)
    reference = logits[..., :50].float().requires_grad_()
    ref_loss = F.cross_entropy(reference.view(-1, 50), target.view(-1), reduction="none").view(3, 5)
    (ref_loss * weights).sum().backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    expected = torch.zeros(3, 5, 64)
    expected[..., :50] = reference.grad
    torch.testing.assert_close(grad, torch.chunk(expected, world_size, dim=-1)[rank].bfloat16(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_chunked_cross_entropy_model_parallel_bf16(world_size: int) -> None:
    # At 4 ranks the last rank (ids 48-63) holds 2 true ids and 14 padding columns.
    run_distributed(_check_chunked_model_parallel, world_size)


def _linear_inputs(padded_vocab: int, vocab: int, dtype: torch.dtype, hidden_size: int = 8) -> tuple:
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(3, 5, hidden_size, generator=gen) * 2).to(dtype)
    weight = torch.randn(padded_vocab, hidden_size, generator=gen).to(dtype)
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    weights = torch.rand(3, 5, generator=gen)
    return hidden, weight, target, weights


def _linear_loss_and_grads(hidden, weight, target, weights, vocab, fused: bool) -> list[torch.Tensor]:
    """Loss and the gradients of hidden and weight: fused, or F.linear + the reference cross-entropy
    (in fp32: half inputs widened exactly, so the reference has no half rounding in between)."""
    if not fused:
        hidden, weight = hidden.float(), weight.float()
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if fused:
        loss = mpu.vocab_parallel_linear_cross_entropy(hidden, weight, target, vocab)
    else:
        logits = F.linear(hidden, weight)[..., :vocab]
        loss = F.cross_entropy(logits.reshape(-1, vocab), target.view(-1), reduction="none").view(target.shape)
    (loss * weights).sum().backward()
    return [loss.detach(), hidden.grad, weight.grad]


@pytest.mark.parametrize("vocab,padded_vocab", [(50, 50), (50, 64)])
def test_linear_cross_entropy_equals_linear_then_torch(serial_mpu, small_chunks, vocab, padded_vocab) -> None:
    inputs = _linear_inputs(padded_vocab, vocab, torch.float32)
    fused = _linear_loss_and_grads(*inputs, vocab, fused=True)
    reference = _linear_loss_and_grads(*inputs, vocab, fused=False)
    for ours, expected in zip(fused, reference):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not fused[2][vocab:].any()  # padding rows of the weight take no gradient


def test_linear_cross_entropy_half_is_within_half_rounding(serial_mpu, small_chunks) -> None:
    inputs = _linear_inputs(64, 50, torch.bfloat16)
    fused = _linear_loss_and_grads(*inputs, 50, fused=True)
    reference = _linear_loss_and_grads(*inputs, 50, fused=False)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == torch.bfloat16
    # The logits are rounded to bf16 once (as the model's bf16 logits are), so the loss differs by
    # that rounding; the gradients by a few bf16 roundings of their largest entries.
    torch.testing.assert_close(fused[0], reference[0], atol=0.1, rtol=0.02)
    for ours, expected in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(ours.float(), expected, atol=0.02 * expected.abs().max().item(), rtol=0.02)


def test_linear_cross_entropy_equals_the_logits_path_in_bf16(serial_mpu, small_chunks) -> None:
    """Against bf16 logits through vocab_parallel_cross_entropy: the same loss bit for bit (both
    read the same bf16 logits), gradients within the extra rounding of the scaled operands."""
    hidden, weight, target, weights = _linear_inputs(64, 50, torch.bfloat16)
    fused = _linear_loss_and_grads(hidden, weight, target, weights, 50, fused=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(F.linear(h, w), target, 50)
    (loss * weights).sum().backward()
    assert torch.equal(fused[0], loss.detach())
    for ours, expected in zip(fused[1:], (h.grad, w.grad)):
        torch.testing.assert_close(ours, expected, atol=0.01 * expected.abs().max().item(), rtol=0.01)


def test_linear_cross_entropy_without_grad_gives_the_loss(serial_mpu) -> None:
    hidden, weight, target, weights = _linear_inputs(64, 50, torch.float32)
    with torch.no_grad():
        loss = mpu.vocab_parallel_linear_cross_entropy(hidden, weight, target, 50)
    torch.testing.assert_close(loss, _linear_loss_and_grads(hidden, weight, target, weights, 50, fused=False)[0])


def test_linear_cross_entropy_buffer_is_reused_when_free_only(serial_mpu) -> None:
    hidden, weight, target, weights = _linear_inputs(64, 50, torch.float32)
    pointers = []
    for _ in range(3):
        _linear_loss_and_grads(hidden, weight, target, weights, 50, fused=True)
        pointers.append(next(iter(cross_entropy._linear_buffers.values())).data_ptr())
    assert len(set(pointers)) == 1
    # A graph not yet backpropagated holds the buffer: a second forward must not overwrite it.
    first = hidden.clone().requires_grad_()
    pending = mpu.vocab_parallel_linear_cross_entropy(first, weight, target, 50)
    _linear_loss_and_grads(hidden * 2, weight, target, weights, 50, fused=True)
    (pending * weights).sum().backward()
    expected = _linear_loss_and_grads(hidden, weight, target, weights, 50, fused=False)[1]
    torch.testing.assert_close(first.grad, expected, atol=1e-5, rtol=1e-5)


def _check_linear_model_parallel(rank: int, world_size: int, dtype: torch.dtype) -> None:
    cross_entropy.CHUNK_BYTES = 2 * 4 * 32  # several chunks per rank
    mpu.initialize_model_parallel(world_size)
    hidden, weight, target, weights = _linear_inputs(64, 50, dtype)
    serial = _linear_loss_and_grads(hidden, weight, target, weights, 50, fused=False)
    shard = torch.chunk(weight, world_size, dim=0)[rank]
    h = hidden.clone().requires_grad_()
    w = shard.clone().requires_grad_()
    loss = mpu.vocab_parallel_linear_cross_entropy(mpu.copy_to_model_parallel_region(h), w, target, 50)
    (loss * weights).sum().backward()
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    torch.testing.assert_close(loss, serial[0], **tolerance)
    for ours, expected in ((h.grad, serial[1]), (w.grad, torch.chunk(serial[2], world_size, dim=0)[rank])):
        scale = expected.abs().max().item()
        atol = 1e-5 if dtype == torch.float32 else 0.02 * scale
        torch.testing.assert_close(ours.float(), expected, atol=atol, rtol=tolerance["rtol"])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_model_parallel_equals_serial(world_size: int, dtype: torch.dtype) -> None:
    # At 4 ranks the last rank (ids 48-63) holds 2 true ids and 14 padding columns.
    run_distributed(_check_linear_model_parallel, world_size, dtype)


def test_half_outputs_give_the_same_loss_and_gradients(serial_mpu) -> None:
    logits, target, weights = _inputs(64, 50, torch.float32)
    results = []
    for cast_outputs in (True, False):
        torch.manual_seed(0)
        model = FP16_Module(nn.Linear(64, 64), dtype=torch.bfloat16, cast_outputs=cast_outputs)
        out = model(logits)
        assert out.dtype == (torch.float32 if cast_outputs else torch.bfloat16)
        (mpu.vocab_parallel_cross_entropy(out, target, 50) * weights).sum().backward()
        results.append([p.grad for p in model.parameters()])
    for with_cast, without in zip(*results):
        assert torch.equal(with_cast, without)


def test_master_grads_are_the_widened_model_grads() -> None:
    torch.manual_seed(0)
    model = FP16_Module(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), dtype=torch.bfloat16)
    optimizer = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    for _ in range(2):  # the second pass copies into existing master grads (the _foreach path)
        optimizer.zero_grad(set_to_none=False)
        optimizer.backward(model(torch.randn(4, 8)).square().sum())
        for half, master in zip(optimizer.half_params, optimizer.master_params):
            assert master.grad.dtype == torch.float32
            assert torch.equal(master.grad, half.grad.float())
        optimizer.step()


def test_build_optimizer_fuses_adamw_where_torch_can() -> None:
    from arguments import build_parser, build_run_config

    run = build_run_config(build_parser().parse_args(["--lr", "1e-3", "--weight-decay", "0.01"]),
                           vocab_size=128, eod_token=127, environ={})
    optimizer = build_optimizer([{"params": [nn.Parameter(torch.ones(3))]}], run)
    assert optimizer.defaults["fused"] == fused_adamw_available(torch.device("cpu"))
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4):
        assert optimizer.defaults["fused"]  # CPU fused AdamW exists since torch 2.4
