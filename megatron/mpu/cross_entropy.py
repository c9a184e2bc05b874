"""Cross-entropy over logits split along the vocabulary, without gathering them.

``vocab_parallel_cross_entropy`` takes logits; ``vocab_parallel_linear_cross_entropy`` takes the
hidden states and this rank's slice of the output weight and never keeps the logits: it writes them
once into a reused buffer and turns that, in forward, into the gradient ``softmax - one_hot``.
"""

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


_grad_buffers: dict[tuple, torch.Tensor] = {}  # the cross-entropy's logits gradient
_linear_buffers: dict[tuple, torch.Tensor] = {}  # the linear cross-entropy's logits


def _reusable(cache: dict[tuple, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """An uninitialised tensor; on CPU the one ``cache`` handed out last, when nothing else holds it.

    A fresh CPU tensor of the logits' size costs more in page faults than the softmax written into it
    (glibc hands such blocks back to the kernel on free). The buffer is reused only when ``cache``
    holds its storage's sole reference (count 2 while ``untyped_storage()`` is alive), so a tensor
    kept by a caller (``retain_grad``, a hook, a saved activation) is never overwritten. Callers get
    a view, whose reference shows in that count.
    """
    if device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype)
    buffer = cache.get(key)
    if buffer is None or torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) != 2:
        cache.clear()  # one live size at a time: no memory kept for shapes not seen again
        buffer = cache[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer.view(shape)


def _grad_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like ``like`` (see ``_reusable``)."""
    return _reusable(_grad_buffers, tuple(like.shape), like.dtype, like.device)


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


def _valid_columns(partition_vocab: int, vocab_size: int | None) -> tuple[int, int]:
    """``(vocab_start, valid)``: this rank's first id and how many of its columns are true ids
    (padding columns, ids >= ``vocab_size``, take no probability mass)."""
    vocab_start, _ = vocab_range_for_rank(partition_vocab, get_model_parallel_rank())
    valid = partition_vocab if vocab_size is None else min(max(vocab_size - vocab_start, 0), partition_vocab)
    return vocab_start, valid


def _target_columns(target: torch.Tensor, vocab_start: int, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local_target, outside)``: each row's target column on this rank (0 where it is not here)."""
    flat_target = target.reshape(-1)
    outside = (flat_target < vocab_start) | (flat_target >= vocab_start + valid)
    return (flat_target - vocab_start).masked_fill(outside, 0), outside


def _global_max(logits: torch.Tensor) -> torch.Tensor:
    """Each row's max over the whole vocabulary (all model-parallel ranks), fp32."""
    if logits.size(-1) > 0:
        logits_max = logits.amax(dim=-1).float()  # exact in the input dtype
    else:
        logits_max = torch.full((logits.size(0),), float("-inf"), device=logits.device)
    _all_reduce(logits_max, dist.ReduceOp.MAX)
    return logits_max


def _target_logit(logits: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Each row's target logit, fp32, from the rank that holds it (summed over the group)."""
    predicted = torch.zeros(logits.size(0), dtype=torch.float32, device=logits.device)
    if logits.size(-1) > 0:
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float().masked_fill(outside, 0.0)
    _all_reduce(predicted)
    return predicted


def _sum_exp(logits: torch.Tensor, logits_max: torch.Tensor) -> torch.Tensor:
    """Each row's sum of ``exp(logits - max)`` over the whole vocabulary, fp32, chunk by chunk."""
    sum_exp = torch.zeros_like(logits_max)
    chunks = _chunks(len(logits_max), logits.size(-1))
    scratch = _scratch(chunks, logits.size(-1), logits_max)
    for start, end in chunks:
        exp_logits = _shifted_exp(logits[start:end], logits_max[start:end], scratch[: end - start])
        torch.sum(exp_logits, dim=-1, out=sum_exp[start:end])
    _all_reduce(sum_exp)
    return sum_exp


def _write_softmax_grad(logits: torch.Tensor, logits_max: torch.Tensor, sum_exp: torch.Tensor,
                        local_target: torch.Tensor, outside: torch.Tensor, out: torch.Tensor,
                        grad: torch.Tensor | None = None) -> None:
    """``(softmax - one_hot(target)) * grad`` (rows scaled by ``grad``, if given) into ``out``,
    which may be ``logits`` itself; computed chunk by chunk in fp32, rounded once to ``out``'s dtype."""
    one_hot = (~outside).float().unsqueeze(-1)
    chunks = _chunks(len(logits_max), logits.size(-1))
    scratch = _scratch(chunks, logits.size(-1), logits_max)
    for start, end in chunks:
        softmax = _shifted_exp(logits[start:end], logits_max[start:end], scratch[: end - start])
        softmax.div_(sum_exp[start:end].unsqueeze(-1))
        softmax.scatter_add_(-1, local_target[start:end].unsqueeze(-1), -one_hot[start:end])
        if grad is not None:
            softmax.mul_(grad[start:end].unsqueeze(-1))
        out[start:end].copy_(softmax)


def _softmax_grad_one_pass_(logits: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor,
                            with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One model-parallel rank: ``(max, sum of exp)`` per row, fp32, and with ``with_grad``
    ``logits`` (rows, vocab) turned into ``softmax - one_hot(target)`` in place, in one pass: each
    chunk of rows is read from memory once and finished while it is in cache."""
    rows, vocab = logits.shape
    logits_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    sum_exp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    chunks = _chunks(rows, vocab)
    scratch = _scratch(chunks, vocab, logits_max)
    one_hot = (~outside).float().unsqueeze(-1)
    for start, end in chunks:
        chunk = logits[start:end]
        logits_max[start:end] = chunk.amax(dim=-1)
        softmax = _shifted_exp(chunk, logits_max[start:end], scratch[: end - start])
        torch.sum(softmax, dim=-1, out=sum_exp[start:end])
        if with_grad:
            softmax.div_(sum_exp[start:end].unsqueeze(-1))
            softmax.scatter_add_(-1, local_target[start:end].unsqueeze(-1), -one_hot[start:end])
            chunk.copy_(softmax)
    return logits_max, sum_exp


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Saves the logits themselves (any float dtype) and two fp32 numbers per row; forward and
    backward recompute ``exp(logits - max)`` chunk by chunk in fp32."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size):
        partition_vocab = vocab_parallel_logits.size(-1)
        vocab_start, valid = _valid_columns(partition_vocab, vocab_size)
        logits = vocab_parallel_logits.reshape(-1, partition_vocab)[:, :valid]  # (rows, valid), a view
        local_target, outside = _target_columns(target, vocab_start, valid)
        logits_max = _global_max(logits)
        predicted = _target_logit(logits, local_target, outside)
        sum_exp = _sum_exp(logits, logits_max)
        loss = torch.log(sum_exp) - (predicted - logits_max)
        ctx.save_for_backward(vocab_parallel_logits, local_target, outside, logits_max, sum_exp)
        ctx.valid = valid
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        """(softmax - one_hot(target)) * grad_output, in fp32, cast to the logits' dtype."""
        vocab_parallel_logits, local_target, outside, logits_max, sum_exp = ctx.saved_tensors
        partition_vocab = vocab_parallel_logits.size(-1)
        logits = vocab_parallel_logits.reshape(-1, partition_vocab)[:, :ctx.valid]
        grad_input = _grad_buffer(vocab_parallel_logits).view(-1, partition_vocab)
        grad_input[:, ctx.valid:].zero_()
        _write_softmax_grad(logits, logits_max, sum_exp, local_target, outside, grad_input[:, :ctx.valid],
                            grad_output.reshape(-1).float())
        return grad_input.view_as(vocab_parallel_logits), None, None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(hidden @ weight.T, target)``: the logits are written once, into a reused
    buffer, and turned in place into ``G = softmax - one_hot`` during forward (on one rank with one
    exp per logit); nothing else of their size is kept. Backward scales rows of the matmuls' small
    operands by the loss gradient ``g`` instead of the logits-sized ``G``:
    ``dH = g * (G @ W)``, ``dW = G.T @ (g * H)``."""

    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_size):
        partition_vocab = weight.size(0)
        vocab_start, valid = _valid_columns(partition_vocab, vocab_size)
        buffer = _reusable(_linear_buffers, (hidden.size(0), partition_vocab), hidden.dtype, hidden.device)
        torch.mm(hidden, weight.t(), out=buffer)
        logits = buffer[:, :valid]
        local_target, outside = _target_columns(target, vocab_start, valid)
        with_grad = any(ctx.needs_input_grad[:2])
        predicted = _target_logit(logits, local_target, outside)  # read before logits become G
        if get_model_parallel_world_size() == 1:
            logits_max, sum_exp = _softmax_grad_one_pass_(logits, local_target, outside, with_grad)
        else:  # the max and the sum must be global before G can be written
            logits_max = _global_max(logits)
            sum_exp = _sum_exp(logits, logits_max)
            if with_grad:
                _write_softmax_grad(logits, logits_max, sum_exp, local_target, outside, logits)
        if with_grad:
            buffer[:, valid:].zero_()  # padding columns take no gradient
            ctx.save_for_backward(hidden, weight, buffer)
        return (torch.log(sum_exp) - (predicted - logits_max)).view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, softmax_grad = ctx.saved_tensors
        grad = grad_output.reshape(-1, 1).float()
        grad_hidden = torch.mm(softmax_grad, weight).float().mul_(grad).to(hidden.dtype)
        grad_weight = torch.mm(softmax_grad.t(), (hidden.float() * grad).to(hidden.dtype))
        return grad_hidden, grad_weight, None, None


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        vocab_size: int | None = None) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(hidden @ weight.T, target, vocab_size)`` without keeping the logits.

    ``hidden`` is ``[..., h]`` (the same on every model-parallel rank: pass it through
    ``copy_to_model_parallel_region`` first, whose backward sums the ranks' input gradients),
    ``weight`` this rank's ``(padded_vocab / mp, h)`` slice in ``hidden``'s dtype, ``target``
    ``hidden.shape[:-1]`` true vocabulary ids. Returns per-token fp32 losses, ``target.shape``.

    Memory: one logits-sized buffer (reused across steps on CPU) holds the logits and then their
    gradient ``softmax - one_hot``, in ``hidden``'s dtype; nothing else of that size is allocated.
    Every rank of the model-parallel group must call it (three all-reduces of one number per row).
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and targets {tuple(target.shape)} "
                         "must agree in every dimension but the last")
    flat = hidden.reshape(-1, hidden.size(-1))
    return _VocabParallelLinearCrossEntropy.apply(flat.contiguous(), weight, target, vocab_size)


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
