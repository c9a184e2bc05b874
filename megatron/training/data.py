"""The data iterators of a training run, shared by every pretraining entry point (GPT-2, BERT).

Datasets are built on model-parallel rank 0 of each group (the other ranks get their batches by
broadcast); the training iterator resumes at the samples already consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.config import RunConfig

# build_datasets(run, (train, valid, test) samples) -> three datasets (None: no such split)
DatasetsBuilder = Callable[[RunConfig, tuple[int, int, int]], tuple[Any, Any, Any]]
# build_loader(dataset, micro_batch, num_workers, consumed_samples, dp_rank, dp_size) -> iterable
LoaderBuilder = Callable[..., Any]


@dataclass(frozen=True)
class DataIterators:
    """Train/valid/test iterators (None on ranks that do not read data, or for a missing split)
    and whether validation and test run; the flags are the same on every rank."""

    train: Iterator | None
    valid: Iterator | None
    test: Iterator | None
    do_valid: bool
    do_test: bool


# data_provider(run, consumed_samples) -> DataIterators; every rank calls it.
DataProvider = Callable[[RunConfig, int], DataIterators]


def requested_samples(run: RunConfig) -> tuple[int, int, int]:
    """Samples the train, validation and test splits must provide for this run."""
    training = run.training
    eval_batch = training.eval_batch_size * run.parallel.data_parallel_size
    evaluations = training.train_iters // training.eval_interval + 1
    return (training.train_iters * run.global_batch_size, evaluations * training.eval_iters * eval_batch,
            training.eval_iters * eval_batch)


def _cycle(loader: Any) -> Iterator:
    while True:
        yield from loader


def build_data_iterators(run: RunConfig, consumed_samples: int, build_datasets: DatasetsBuilder,
                         build_loader: LoaderBuilder) -> DataIterators:
    """Iterators on model-parallel rank 0 of each group (None elsewhere: the batches are
    broadcast); whether validation and test run is agreed on every rank.

    The training iterator resumes at ``consumed_samples``; evaluation iterators cycle.
    """
    training = run.training
    flags = torch.zeros(2, dtype=torch.long, device=mpu.communication_device())
    iterators: list[Any] = [None, None, None]
    if mpu.get_model_parallel_rank() == 0:
        datasets = build_datasets(run, requested_samples(run))
        consumed = (consumed_samples, 0, 0)
        micro = (training.micro_batch_size, training.eval_batch_size, training.eval_batch_size)
        for i, dataset in enumerate(datasets):
            if dataset is not None and len(dataset) > 0:
                loader = build_loader(dataset, micro[i], run.data.num_workers, consumed[i],
                                      mpu.get_data_parallel_rank(), run.parallel.data_parallel_size)
                iterators[i] = iter(loader) if i == 0 else _cycle(loader)
        flags[0], flags[1] = int(iterators[1] is not None), int(iterators[2] is not None)
    dist.broadcast(flags, 0)
    evaluates = training.eval_iters > 0
    return DataIterators(iterators[0], iterators[1], iterators[2], do_valid=bool(flags[0]) and evaluates,
                         do_test=bool(flags[1]) and evaluates)
