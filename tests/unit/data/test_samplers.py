"""MegatronPretrainingSampler resumes exactly; the loader yields LongTensor batches per rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from megatron.data.samplers import MegatronPretrainingSampler, build_data_loader


class CountingDataset(torch.utils.data.Dataset):
    """Sample i is ``[i, i, ..., i]`` (seq_length + 1 = 5 tokens)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"text": np.full(5, index, dtype=np.int64)}


def batches(total, consumed, micro, rank, size):
    return list(MegatronPretrainingSampler(total, consumed, micro, rank, size))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_resume_equals_uninterrupted(dp_size):
    micro, total = 3, 100
    for rank in range(dp_size):
        full = batches(total, 0, micro, rank, dp_size)
        for steps in range(len(full) + 1):
            consumed = steps * micro * dp_size
            if consumed >= total:
                continue
            assert batches(total, consumed, micro, rank, dp_size) == full[steps:]


def test_ranks_partition_each_global_batch():
    per_rank = [batches(50, 0, 2, rank, 3) for rank in range(3)]
    for step, parts in enumerate(zip(*per_rank)):
        assert sum(parts, []) == list(range(step * 6, step * 6 + 6))
    assert len(per_rank[0]) == 50 // 6  # drop_last


def test_sampler_errors():
    with pytest.raises(ValueError, match="consumed samples 101"):
        MegatronPretrainingSampler(100, 101, 2, 0, 1)
    # A finished run relaunched (automatic resume) has nothing left to draw.
    assert list(MegatronPretrainingSampler(100, 100, 2, 0, 1)) == []
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        MegatronPretrainingSampler(100, 0, 2, 2, 2)


def test_loader_batches_and_resume():
    dataset = CountingDataset(40)
    loader = build_data_loader(dataset, 4, 0, 8, 1, 2)
    first = next(iter(loader))["text"]
    assert first.dtype == torch.long and first.shape == (4, 5)
    assert first[:, 0].tolist() == [12, 13, 14, 15]  # consumed 8, rank 1 of 2, micro 4


def _distributed_loader(rank: int, world_size: int) -> None:
    loader = build_data_loader(CountingDataset(64), 2, 1, 4, rank, world_size)
    seen = torch.cat([batch["text"][:, 0] for batch in loader])
    gathered = [torch.zeros_like(seen) for _ in range(world_size)]
    dist.all_gather(gathered, seen)
    assert sorted(torch.cat(gathered).tolist()) == list(range(4, 64))


def test_loader_on_two_ranks():
    run_distributed(_distributed_loader, 2)
