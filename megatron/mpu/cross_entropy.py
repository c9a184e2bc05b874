"""Cross-entropy over logits split along the vocabulary, without gathering them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
)
from .utils import vocab_range_for_rank

# fp32 scratch per chunk of rows. The logits (b * s rows of a whole vocabulary) are read chunk by
# chunk into this cache-sized buffer: the fp32 softmax never exists at full size, and neither does
# an fp32 copy of half-precision logits.
CHUNK_BYTES = 2 << 20


_grad_buffers: dict[tuple, torch.Tensor] = {}


def _grad_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``like``; on CPU the previous call's one when nothing else holds it.

    A fresh CPU tensor of the logits' size costs more in page faults than the softmax written into it
    (glibc hands such blocks back to the kernel on free). The buffer is reused only when this cache
    holds its storage's sole reference (count 2 while ``untyped_storage()`` is alive), so a gradient
    kept by a caller (``retain_grad``, a hook) is never overwritten.
    """
    if like.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty_like(like)
    key = (tuple(like.shape), like.dtype)
    buffer = _grad_buffers.get(key)
    if buffer is None or torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) != 2:
        _grad_buffers.clear()  # one live size at a time: no memory kept for shapes not seen again
        buffer = _grad_buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
    return buffer


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=get_model_parallel_group())


def _chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` whose ``cols`` fp32 columns fit in ``CHUNK_BYTES`` (none if no columns)."""
    step = max(1, CHUNK_BYTES // (4 * max(cols, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] if cols > 0 else []


def _scratch(chunks: list[tuple[int, int]], cols: int, like: torch.Tensor) -> torch.Tensor:
    """An fp32 buffer for the largest (the first) chunk."""
    rows = chunks[0][1] - chunks[0][0] if chunks else 0
    return torch.empty(rows, cols, dtype=torch.float32, device=like.device)


def _shifted_exp(logits: torch.Tensor, logits_max: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp(logits - max)`` in fp32 into ``out`` (rows of ``logits``, ``max`` per row)."""
    torch.sub(logits, logits_max.unsqueeze(-1), out=out)
    return out.exp_()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Saves the logits themselves (any float dtype) and two fp32 numbers per row; forward and
    backward recompute ``exp(logits - max)`` chunk by chunk in fp32."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size):
        partition_vocab = vocab_parallel_logits.size(-1)
        vocab_start, vocab_end = vocab_range_for_rank(partition_vocab, get_model_parallel_rank())
        # Padding columns (ids >= vocab_size) take no probability mass: only [:valid] is read.
        valid = partition_vocab if vocab_size is None else min(max(vocab_size - vocab_start, 0), partition_vocab)
        logits = vocab_parallel_logits.reshape(-1, partition_vocab)[:, :valid]  # (rows, valid), a view
        flat_target = target.reshape(-1)

        if valid > 0:
            logits_max = logits.amax(dim=-1).float()  # exact in the input dtype
        else:
            logits_max = torch.full(flat_target.shape, float("-inf"), device=logits.device)
        _all_reduce(logits_max, dist.ReduceOp.MAX)

        outside = (flat_target < vocab_start) | (flat_target >= vocab_start + valid)
        local_target = (flat_target - vocab_start).masked_fill(outside, 0)
        predicted = torch.zeros_like(logits_max)
        if valid > 0:
            predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float() - logits_max
            predicted = predicted.masked_fill(outside, 0.0)
        _all_reduce(predicted)

        sum_exp = torch.zeros_like(logits_max)
        chunks = _chunks(len(logits_max), valid)
        scratch = _scratch(chunks, valid, logits_max)
        for start, end in chunks:
            exp_logits = _shifted_exp(logits[start:end], logits_max[start:end], scratch[: end - start])
            torch.sum(exp_logits, dim=-1, out=sum_exp[start:end])
        _all_reduce(sum_exp)
        loss = torch.log(sum_exp) - predicted

        ctx.save_for_backward(vocab_parallel_logits, local_target, outside, logits_max, sum_exp)
        ctx.valid = valid
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        """(softmax - one_hot(target)) * grad_output, in fp32, cast to the logits' dtype."""
        vocab_parallel_logits, local_target, outside, logits_max, sum_exp = ctx.saved_tensors
        valid = ctx.valid
        partition_vocab = vocab_parallel_logits.size(-1)
        logits = vocab_parallel_logits.reshape(-1, partition_vocab)[:, :valid]
        grad_input = _grad_buffer(vocab_parallel_logits).view(-1, partition_vocab)
        grad_input[:, valid:].zero_()
        grad = grad_output.reshape(-1).float()
        one_hot = (~outside).float().unsqueeze(-1)
        chunks = _chunks(len(logits_max), valid)
        scratch = _scratch(chunks, valid, logits_max)
        for start, end in chunks:
            softmax = _shifted_exp(logits[start:end], logits_max[start:end], scratch[: end - start])
            softmax.div_(sum_exp[start:end].unsqueeze(-1))
            softmax.scatter_add_(-1, local_target[start:end].unsqueeze(-1), -one_hot[start:end])
            softmax.mul_(grad[start:end].unsqueeze(-1))
            grad_input[start:end, :valid].copy_(softmax)
        return grad_input.view_as(vocab_parallel_logits), None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Per-token cross-entropy loss, shape ``target.shape``, computed in fp32.

    ``vocab_parallel_logits`` is ``[..., padded_vocab / mp]`` on each model-parallel rank, in any
    float dtype (bf16/fp16 logits are widened chunk by chunk, never copied whole); the gradient
    has the logits' dtype. When ``vocab_size`` (the true vocabulary) is given, padding columns
    beyond it are excluded from the softmax, so the loss equals ``F.cross_entropy`` over the true
    vocabulary. Targets must be true vocabulary ids (below ``vocab_size``).
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, vocab_size)
