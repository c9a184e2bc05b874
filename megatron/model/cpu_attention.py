"""Causal self-attention with dropout on the probabilities, for training on CPU.

``F.scaled_dot_product_attention`` has no CPU kernel that takes dropout: it falls back to its math
path, which passes over the ``(b, heads, s, s)`` scores many times (scaling, a boolean mask turned
into -inf, a "safe" softmax, ``bernoulli_`` masks, the dropout multiply) and, at GPT-2 124M's
shape (4 x 12 heads x 512 x 512), allocates each 50 MB fp32 intermediate afresh. Here each head's
``(s, s)`` block is finished while it is in cache (scores with the causal bias in one ``addmm``,
softmax, dropout, product with the values), and backward does the same from the saved
probabilities and mask (fp32); half precision and ``torch.compile`` (for inductor to fuse) take
the plain formulation: one ``baddbmm`` for the scores and the causal bias, softmax, dropout, ``bmm``.

Shapes: b = batch, heads = heads on this rank, s = sequence, hn = head size.
"""

from __future__ import annotations

import math

import torch

from .dropout import dropout, keep_mask, keep_scale, mask_bits


def _causal_bias(s: int, like: torch.Tensor) -> torch.Tensor:
    """``(s, s)``: 0 where a query may attend (key <= query), -inf above the diagonal."""
    return torch.full((s, s), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def _plain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The whole batch at once: scores, softmax, ``dropout.dropout``, values."""
    b, heads, s, head_size = query.shape
    scores = torch.baddbmm(_causal_bias(s, query).unsqueeze(0), query.reshape(b * heads, s, head_size),
                           key.reshape(b * heads, s, head_size).transpose(1, 2), alpha=1.0 / math.sqrt(head_size))
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p)  # (b heads, s, s)
    return torch.bmm(probs, value.reshape(b * heads, s, head_size)).view(b, heads, s, head_size)


class _BlockedCausalAttention(torch.autograd.Function):
    """Head by head; saves the softmax probabilities ``(b, heads, s, s)`` and the boolean keep mask.

    The mask is drawn block by block in (batch, head) order, which draws the same numbers as
    ``keep_mask`` of the whole ``(b, heads, s, s)`` at once (when ``s * s`` does not split into whole
    draws, it is drawn at once):
    the masks of ``_plain``, so compiled and eager runs drop the same probabilities."""

    @staticmethod
    def forward(ctx, query, key, value, dropout_p):
        b, heads, s, head_size = query.shape
        bias = _causal_bias(s, query)
        probs = torch.empty(b, heads, s, s, dtype=query.dtype, device=query.device)
        keep = torch.empty(b, heads, s, s, dtype=torch.bool, device=query.device)
        context = torch.empty(b, heads, s, head_size, dtype=query.dtype, device=query.device)
        scratch = torch.empty(s, s, dtype=query.dtype, device=query.device)
        scale, kept_scale = 1.0 / math.sqrt(head_size), keep_scale(dropout_p, query.dtype)
        bits = mask_bits(query.dtype, dropout_p)
        whole_mask = s * s % (64 // bits) != 0  # blocks would not split the draws as one mask does
        if whole_mask:
            keep_mask(keep.shape, 1.0 - dropout_p, query.device, out=keep, bits=bits)
        for i in range(b):
            for j in range(heads):
                torch.addmm(bias, query[i, j], key[i, j].t(), alpha=scale, out=scratch)
                torch.ops.aten._softmax.out(scratch, -1, False, out=probs[i, j])
                if not whole_mask:
                    keep_mask((s, s), 1.0 - dropout_p, query.device, out=keep[i, j], bits=bits)
                torch.mul(probs[i, j], keep[i, j], out=scratch).mul_(kept_scale)
                torch.mm(scratch, value[i, j], out=context[i, j])
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.scales = scale, kept_scale
        return context

    @staticmethod
    def backward(ctx, grad_context):
        query, key, value, probs, keep = ctx.saved_tensors
        scale, kept_scale = ctx.scales
        b, heads, s, head_size = query.shape
        grads = [torch.empty(b, heads, s, head_size, dtype=query.dtype, device=query.device) for _ in range(3)]
        grad_query, grad_key, grad_value = grads
        grad_probs, work = (torch.empty(s, s, dtype=query.dtype, device=query.device) for _ in range(2))
        for i in range(b):
            for j in range(heads):
                grad = grad_context[i, j]
                torch.mm(grad, value[i, j].t(), out=grad_probs)  # of the dropped-out probabilities
                torch.mul(probs[i, j], keep[i, j], out=work).mul_(kept_scale)  # those probabilities again
                torch.mm(work.t(), grad, out=grad_value[i, j])
                grad_probs.mul_(keep[i, j]).mul_(kept_scale)
                torch.ops.aten._softmax_backward_data.out(grad_probs, probs[i, j], -1, query.dtype, grad_input=work)
                torch.mm(work, key[i, j], out=grad_query[i, j]).mul_(scale)
                torch.mm(work.t(), query[i, j], out=grad_key[i, j]).mul_(scale)
        return grad_query, grad_key, grad_value, None


def causal_attention_with_dropout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  dropout_p: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)`` with the
    probabilities' dropout drawn by ``dropout.keep_mask`` (from the default generator: call it
    under the model-parallel RNG tracker's ``fork()``). ``(b, heads, s, hn)`` in, the same out.

    Head by head for fp32; all at once for half precision, whose batched matmuls beat per-head ones
    by more than the extra passes over its half-size scores cost (measured on a 2-core EPYC: per
    head 0.5x-0.9x the time in fp32, 1.3x-1.5x in bf16)."""
    if torch.compiler.is_compiling() or query.dtype != torch.float32:
        return _plain(query, key, value, dropout_p)
    return _BlockedCausalAttention.apply(query, key, value, dropout_p)
