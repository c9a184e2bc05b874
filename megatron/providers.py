"""Pieces every pretraining entry point (GPT-2, BERT) shares: data iterators, vocabulary sizes,
and leaving the process."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu

DatasetsBuilder = Callable[[argparse.Namespace, tuple[int, int, int]], tuple[Any, Any, Any]]
LoaderBuilder = Callable[..., Any]


def global_batch_size(args: argparse.Namespace) -> int:
    return args.batch_size * args.gradient_accumulation_steps * args.data_parallel_size


def requested_samples(args: argparse.Namespace) -> tuple[int, int, int]:
    """Samples the train, validation and test splits must provide for this run."""
    eval_batch = args.eval_batch_size * args.data_parallel_size
    evaluations = args.train_iters // args.eval_interval + 1
    return (args.train_iters * global_batch_size(args), evaluations * args.eval_iters * eval_batch,
            args.eval_iters * eval_batch)


def _cycle(loader: Any) -> Iterator:
    while True:
        yield from loader


def build_data_iterators(args: argparse.Namespace, consumed_samples: int, build_datasets: DatasetsBuilder,
                         build_loader: LoaderBuilder) -> tuple[Any, Any, Any]:
    """Train/valid/test iterators on model-parallel rank 0 of each group (None elsewhere: the
    batches are broadcast); sets ``args.do_valid`` / ``args.do_test`` identically on every rank.

    The training iterator resumes at ``consumed_samples``; evaluation iterators cycle.
    """
    flags = torch.zeros(2, dtype=torch.long, device=mpu.communication_device())
    iterators: list[Any] = [None, None, None]
    if mpu.get_model_parallel_rank() == 0:
        datasets = build_datasets(args, requested_samples(args))
        consumed = (consumed_samples, 0, 0)
        micro = (args.batch_size, args.eval_batch_size, args.eval_batch_size)
        for i, dataset in enumerate(datasets):
            if dataset is not None and len(dataset) > 0:
                loader = build_loader(dataset, micro[i], args.num_workers, consumed[i],
                                      mpu.get_data_parallel_rank(), args.data_parallel_size)
                iterators[i] = iter(loader) if i == 0 else _cycle(loader)
        flags[0], flags[1] = int(iterators[1] is not None), int(iterators[2] is not None)
    dist.broadcast(flags, 0)
    args.do_valid = bool(flags[0]) and args.eval_iters > 0
    args.do_test = bool(flags[1]) and args.eval_iters > 0
    return iterators[0], iterators[1], iterators[2]


def set_vocab_sizes(args: argparse.Namespace, tokenizer: Any) -> None:
    """``vocab_size`` (the tokenizer's unless given), ``eod_token`` and the padded vocabulary."""
    args.vocab_size = args.vocab_size or tokenizer.vocab_size
    args.eod_token = tokenizer.eod
    args.padded_vocab_size = mpu.pad_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by,
                                                args.model_parallel_size)


def exit_process(exit_code: int) -> None:
    """Leave without running C++ static destructors: with gloo and DeepSpeed's CPU communication
    threads still alive they occasionally abort (SIGABRT) a run that finished correctly.
    Checkpoints are already fsynced and the process group destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
