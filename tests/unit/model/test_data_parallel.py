"""Bucketed, overlapped data-parallel gradient averaging equals serial training on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from torch import nn

from megatron import mpu
from megatron.model import GPT2Model
from megatron.model.distributed import DistributedDataParallel

VOCAB = 64
CONFIG = dict(num_layers=2, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_sequence_length=16,
              embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
              checkpoint_activations=False)


class WithUnusedLayer(nn.Module):
    """GPT-2 plus a layer that gets no gradient: its bucket never completes during backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.gpt2 = GPT2Model(**CONFIG)
        self.unused = nn.Linear(4, 4)
        mpu.model_parallel_cuda_manual_seed(3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(tokens)


def _micro_batches(rank: int, count: int) -> list[torch.Tensor]:
    """This rank's micro batches: rank r holds rows r, r + 2, ... of one global batch."""
    tokens = torch.randint(0, VOCAB, (2 * count * 2, 13), generator=torch.Generator().manual_seed(17))
    return list(tokens[rank::2].split(2))


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return mpu.vocab_parallel_cross_entropy(logits.float(), tokens[:, 1:]).mean()


def _ddp_grads(rank: int, bucket_bytes: int, micro: int, dtype: torch.dtype, fp32: bool) -> dict[str, torch.Tensor]:
    model = WithUnusedLayer().to(dtype)
    ddp = DistributedDataParallel(model, fp32_allreduce=fp32, bucket_bytes=bucket_bytes)
    for _step in range(2):  # the second step reuses the buckets
        model.zero_grad(set_to_none=True)
        for index, tokens in enumerate(_micro_batches(rank, micro)):
            ddp.sync_gradients = index == micro - 1
            (_loss(ddp, tokens) / micro).backward()
        ddp.allreduce_params()
    return {name: param.grad.float() for name, param in model.named_parameters() if param.grad is not None}


def _serial_grads(micro: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One process, both ranks' micro batches, the same averaging."""
    model = WithUnusedLayer().to(dtype)
    batches = [_micro_batches(rank, micro) for rank in (0, 1)]
    for rank_batches in batches:
        for tokens in rank_batches:
            (_loss(model, tokens) / (2 * micro)).backward()
    return {name: param.grad.float() for name, param in model.named_parameters() if param.grad is not None}


def _check(rank: int, world_size: int, micro: int, dtype: torch.dtype, fp32: bool) -> None:
    mpu.initialize_model_parallel(1)
    one_bucket = _ddp_grads(rank, 1 << 40, micro, dtype, fp32)
    many_buckets = _ddp_grads(rank, 4096, micro, dtype, fp32)
    assert len(DistributedDataParallel(WithUnusedLayer(), bucket_bytes=4096)._buckets) > 5
    assert one_bucket.keys() == many_buckets.keys() and "unused.weight" not in one_bucket
    for name in one_bucket:  # bucketing changes when the all-reduce runs, not what it adds
        assert torch.equal(one_bucket[name], many_buckets[name]), name
    serial = _serial_grads(micro, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, grad in many_buckets.items():
        torch.testing.assert_close(grad, serial[name], atol=tolerance, rtol=tolerance, msg=name)
        other = grad.clone()
        dist.broadcast(other, 0)
        assert torch.equal(other, grad), f"{name} differs across data-parallel ranks"


@pytest.mark.parametrize("micro, dtype, fp32", [(1, torch.float32, False), (2, torch.float32, False),
                                                (2, torch.bfloat16, True)])
def test_bucketed_overlapped_allreduce_equals_serial(micro: int, dtype: torch.dtype, fp32: bool) -> None:
    run_distributed(_check, 2, micro, dtype, fp32)


def _check_no_sync_until_last_micro_batch(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(1)
    model = WithUnusedLayer()
    ddp = DistributedDataParallel(model, bucket_bytes=4096)
    ddp.sync_gradients = False
    _loss(ddp, _micro_batches(rank, 1)[0]).backward()
    assert all(bucket.work is None for bucket in ddp._buckets)
    local = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    ddp.allreduce_params()  # an explicit call still averages everything
    for name, param in model.named_parameters():
        if name in local:
            expected = local[name].clone()
            dist.all_reduce(expected)
            torch.testing.assert_close(param.grad, expected / 2, atol=1e-6, rtol=1e-6)


def test_accumulating_micro_batches_do_not_communicate() -> None:
    run_distributed(_check_no_sync_until_last_micro_batch, 2)
