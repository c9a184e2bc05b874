"""The data iterators of a training run, shared by every pretraining entry point (GPT-2, BERT).

Datasets are built on model-parallel rank 0 of each group (the other ranks get their batches by
broadcast); the training iterator resumes at the samples already consumed. A build that fails on
one rank stops every rank (see ``build_data_iterators``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron import mpu
from megatron.config import RunConfig
from megatron.data.errors import DataError
from megatron.errors import ConfigError, TrainingAborted

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


@dataclass(frozen=True)
class DataPosition:
    """Where a (resumed) run starts: its iteration and the training samples consumed before it."""

    iteration: int = 0
    consumed_samples: int = 0


# data_provider(run, position) -> DataIterators; every rank calls it.
DataProvider = Callable[[RunConfig, DataPosition], DataIterators]


def requested_samples(run: RunConfig, position: DataPosition = DataPosition()) -> tuple[int, int, int]:
    """Samples the train, validation and test splits must provide for this run: the train split
    ``train_iters`` global batches, or more when a resumed run consumed more samples than this
    run's global batch would have (the global batch changed on resume)."""
    training = run.training
    eval_batch = training.eval_batch_size * run.parallel.data_parallel_size
    evaluations = training.train_iters // training.eval_interval + 1
    remaining = max(training.train_iters - position.iteration, 0) * run.global_batch_size
    train = max(training.train_iters * run.global_batch_size, position.consumed_samples + remaining)
    return train, evaluations * training.eval_iters * eval_batch, training.eval_iters * eval_batch


def _cycle(loader: Any) -> Iterator:
    while True:
        yield from loader


def _build_iterators(run: RunConfig, position: DataPosition, build_datasets: DatasetsBuilder,
                     build_loader: LoaderBuilder) -> list[Iterator | None]:
    """This rank's train/valid/test iterators (model-parallel rank 0 only); DataError if the
    datasets include no training samples."""
    training = run.training
    datasets = build_datasets(run, requested_samples(run, position))
    if datasets[0] is None or len(datasets[0]) == 0:
        raise DataError("the training data gives no training samples; check --train-data/--data-path "
                        "and that --split gives the train split documents")
    consumed = (position.consumed_samples, 0, 0)
    micro = (training.micro_batch_size, training.eval_batch_size, training.eval_batch_size)
    iterators: list[Iterator | None] = [None, None, None]
    for i, dataset in enumerate(datasets):
        if dataset is not None and len(dataset) > 0:
            loader = build_loader(dataset, micro[i], run.data.num_workers, consumed[i],
                                  mpu.get_data_parallel_rank(), run.parallel.data_parallel_size)
            iterators[i] = iter(loader) if i == 0 else _cycle(loader)
    return iterators


@dataclass(frozen=True)
class _BuildReport:
    """What one rank tells the others after building its iterators."""

    error_type: str | None  # the exception's class name when the build failed, else None
    message: str
    user_error: bool  # the failure was a ConfigError (bad data or flags)
    has_valid: bool
    has_test: bool


def _raise_agreed_failure(own_error: Exception | None, reports: list[_BuildReport]) -> None:
    """Raise on every rank if any rank's build failed: a failed rank re-raises its own error, the
    others a one-line error naming the failed rank (a ``DataError`` for a user error, else
    ``TrainingAborted``: that rank's traceback has the cause)."""
    if own_error is not None:
        raise own_error
    for rank, report in enumerate(reports):
        if report.error_type is not None and report.user_error:
            raise DataError(f"rank {rank} could not build the datasets: {report.message}")
        if report.error_type is not None:
            raise TrainingAborted(f"rank {rank} failed building the datasets ({report.error_type}: "
                                  f"{report.message[:300]}); its traceback has the cause")


def build_data_iterators(run: RunConfig, position: DataPosition, build_datasets: DatasetsBuilder,
                         build_loader: LoaderBuilder) -> DataIterators:
    """Iterators on model-parallel rank 0 of each group (None elsewhere: the batches are
    broadcast); whether validation and test run is agreed on every rank.

    Every rank calls it; the ranks exchange one report (an all-gather over the world) after the
    builds, so a build that fails on any rank (e.g. ``DataError``: a corpus with no documents)
    stops every rank promptly: the failed ranks raise their error, the others a one-line
    ``DataError`` (or ``TrainingAborted`` for a bug) naming the failed rank, instead of waiting in
    the next collective. The training iterator resumes at ``consumed_samples``; evaluation
    iterators cycle.
    """
    iterators: list[Iterator | None] = [None, None, None]
    failure: Exception | None = None
    if mpu.get_model_parallel_rank() == 0:
        try:
            iterators = _build_iterators(run, position, build_datasets, build_loader)
        except Exception as error:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = error
    report = _BuildReport(None if failure is None else type(failure).__name__, "" if failure is None else str(failure),
                          isinstance(failure, ConfigError), iterators[1] is not None, iterators[2] is not None)
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    _raise_agreed_failure(failure, reports)
    evaluates = run.training.eval_iters > 0
    return DataIterators(iterators[0], iterators[1], iterators[2], do_valid=reports[0].has_valid and evaluates,
                         do_test=reports[0].has_test and evaluates)
