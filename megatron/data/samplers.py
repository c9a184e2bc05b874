"""Distributed batch sampling that resumes exactly, and the data loader built on it.

Global batch ``g`` is samples ``[g * B, (g + 1) * B)`` with ``B = micro_batch_size *
data_parallel_size``; data-parallel rank ``r`` reads the ``r``-th slice of ``micro_batch_size``.
Starting at ``consumed_samples`` continues that sequence exactly where a previous run stopped.
Only model-parallel rank 0 of each data-parallel group needs a loader (the training code
broadcasts batches to the other model-parallel ranks with ``mpu.broadcast_data``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatron.data.errors import DataError


class MegatronPretrainingSampler:
    """Yields this rank's micro batch (a list of sample indices) per global batch."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise DataError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} must be in "
                             f"[0, {data_parallel_size})")
        # consumed == total: a finished run relaunched (automatic resume) draws nothing more.
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(f"consumed samples {consumed_samples} must be in [0, {total_samples}]; "
                            "raise --train-iters to train past the end of the data")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.drop_last = micro_batch_size, drop_last
        self.global_batch_size = micro_batch_size * data_parallel_size
        self.start = data_parallel_rank * micro_batch_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        if self.drop_last:
            return remaining // self.global_batch_size
        return -(-remaining // self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(self.consumed_samples, self.total_samples, self.global_batch_size):
            batch = list(range(first, min(first + self.global_batch_size, self.total_samples)))
            if len(batch) < self.global_batch_size and self.drop_last:
                return
            mine = batch[self.start:self.start + self.micro_batch_size]
            if mine:
                yield mine


def collate_samples(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """``[{"text": int64[s + 1]}] * b`` -> ``{"text": LongTensor(b, s + 1)}``."""
    return {"text": torch.from_numpy(np.stack([sample["text"] for sample in samples])).long()}


def build_data_loader(dataset: torch.utils.data.Dataset, micro_batch_size: int, num_workers: int,
                      consumed_samples: int, data_parallel_rank: int,
                      data_parallel_size: int) -> torch.utils.data.DataLoader:
    """Loader over ``dataset`` for this data-parallel rank, resuming at ``consumed_samples``.

    Batches are ``{"text": LongTensor(micro_batch_size, seq_length + 1)}``; memory is pinned when
    CUDA is available and workers persist across epochs when ``num_workers > 0``.
    """
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    # A private generator: creating an iterator must not draw from the global torch RNG, or a
    # resumed run (RNG restored from the checkpoint, then loaders built) would drift.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_samples, generator=torch.Generator(),
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)
