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


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if get_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=get_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, vocab_size):
        logits = vocab_parallel_logits.float()
        partition_vocab = logits.size(-1)
        vocab_start, vocab_end = vocab_range_for_rank(partition_vocab, get_model_parallel_rank())
        if vocab_size is not None and vocab_size < vocab_end:
            # Padding columns take no probability mass.
            pad_from = max(vocab_size - vocab_start, 0)
            logits = logits.clone()
            logits[..., pad_from:] = float("-inf")

        logits_max = logits.max(dim=-1)[0]
        _all_reduce(logits_max, dist.ReduceOp.MAX)
        logits = logits - logits_max.unsqueeze(-1)

        outside = (target < vocab_start) | (target >= vocab_end)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        predicted = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = predicted.masked_fill(outside, 0.0)
        _all_reduce(predicted)

        exp_logits = logits.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp)
        loss = torch.log(sum_exp) - predicted

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.input_dtype = vocab_parallel_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, local_target, outside = ctx.saved_tensors
        grad_input = softmax
        one_hot = (~outside).to(grad_input.dtype).unsqueeze(-1)
        grad_input.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot)
        grad_input.mul_(grad_output.unsqueeze(-1))
        return grad_input.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Per-token cross-entropy loss, shape ``target.shape``, computed in fp32.

    ``vocab_parallel_logits`` is ``[..., padded_vocab / mp]`` on each model-parallel rank.
    When ``vocab_size`` (the true vocabulary) is given, padding columns beyond it are excluded
    from the softmax, so the loss equals ``F.cross_entropy`` over the true vocabulary.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, vocab_size)
