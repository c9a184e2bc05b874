"""Pretrain GPT-2 (Megatron-LM; ``--deepspeed`` switches the same training to DeepSpeed).

    torchrun --nproc_per_node 2 pretrain_gpt2.py --model-parallel-size 2 --train-data webtext ...
    deepspeed pretrain_gpt2.py --deepspeed --deepspeed_config scripts/ds_zero1_config.json ...
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

import torch

from megatron import mpu
from megatron.config import RunConfig
from megatron.data import build_data_loader, build_train_valid_test_datasets
from megatron.data.demo import ensure_demo_corpus
from megatron.model import GPT2Model, build_gpt2_model, masked_mean
from megatron.model.gpt2_pipe import PipelineDescription, gpt2_pipeline_description
from megatron.tokenizer import AbstractTokenizer, build_tokenizer
from megatron.training.data import DataIterators, DataPosition, build_data_iterators
from megatron.training.entry import exit_process, run_entry_point
from megatron.training.log import print_rank_0
from megatron.training.loop import pretrain


def model_provider(run: RunConfig) -> GPT2Model | PipelineDescription:
    """GPT-2 from ``run.model`` (as pipeline blocks with ``--pipe-parallel-size`` > 1)."""
    print_rank_0(" building GPT2 model ...")
    if run.parallel.pipe_parallel_size > 1:
        return gpt2_pipeline_description(run.model)
    model = build_gpt2_model(run.model)
    if mpu.get_data_parallel_rank() == 0:
        count = sum(p.numel() for p in model.parameters())
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}: {count}",
              flush=True)
    return model.to(run.device)


def get_masks_and_position_ids(tokens: torch.Tensor, eod_token: int, reset_position_ids: bool,
                               reset_attention_mask: bool, eod_mask_loss: bool
                               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Attention mask (None: plain causal), loss mask and position ids for ``tokens`` (b, s)."""
    batch, seq = tokens.shape
    loss_mask = torch.ones(tokens.shape, dtype=torch.float, device=tokens.device)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(seq, dtype=torch.long, device=tokens.device).unsqueeze(0).expand(batch, seq)
    if not (reset_position_ids or reset_attention_mask):
        return None, loss_mask, position_ids
    position_ids = position_ids.clone()
    attention_mask = torch.tril(torch.ones(batch, 1, seq, seq, device=tokens.device))
    for b in range(batch):
        previous = 0
        for index in (tokens[b] == eod_token).nonzero().flatten().tolist():
            if reset_attention_mask:
                attention_mask[b, 0, index + 1:, : index + 1] = 0
            if reset_position_ids:
                position_ids[b, index + 1:] -= index + 1 - previous
            previous = index + 1
    return attention_mask, loss_mask, position_ids


def get_batch(data_iterator: Iterator | None, run: RunConfig) -> tuple[torch.Tensor, ...]:
    """Read on model-parallel rank 0, broadcast to the group, build inputs/labels/masks."""
    data = next(data_iterator) if mpu.get_model_parallel_rank() == 0 else None
    text = mpu.broadcast_data(["text"], data, torch.int64)["text"].to(run.device, non_blocking=True)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    training = run.training
    attention_mask, loss_mask, position_ids = get_masks_and_position_ids(
        tokens, run.eod_token, training.reset_position_ids, training.reset_attention_mask, training.eod_mask_loss)
    return tokens, labels, loss_mask, attention_mask, position_ids


def get_batch_pipe(data_iterator: Iterator | None, run: RunConfig) -> tuple[Any, Any]:
    """A micro batch for the pipeline engine: ``(tokens, (labels, loss_mask))``."""
    tokens, labels, loss_mask, _, _ = get_batch(data_iterator, run)
    return tokens, (labels, loss_mask)


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module, run: RunConfig) -> torch.Tensor:
    """Mean language-model loss of one micro batch (a 0-dim fp32 tensor); the model computes the
    per-token losses itself, fused with its output layer (no logits are kept)."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, run)
    losses = model(tokens, position_ids, attention_mask, labels=labels)
    return masked_mean(losses, loss_mask)


def data_provider(run: RunConfig, position: DataPosition) -> DataIterators:
    """Loaders on model-parallel rank 0 of each group (the others get their batches by broadcast)."""
    def build_datasets(run: RunConfig, num_samples: tuple[int, int, int]) -> tuple[Any, Any, Any]:
        return build_train_valid_test_datasets(run.data, build_tokenizer(run.data), num_samples)

    return build_data_iterators(run, position, build_datasets, build_data_loader)


def _uses_demo(args: argparse.Namespace) -> bool:
    demo_dir = os.path.abspath(args.demo_data_dir)
    in_demo = [p for p in (args.vocab_file, args.merge_file) if p and os.path.dirname(os.path.abspath(p)) == demo_dir]
    return bool(in_demo) or "demo" in (args.train_data or [])


def load_tokenizer(args: argparse.Namespace) -> AbstractTokenizer:
    """The run's tokenizer; builds the demo corpus first if it is used (once, whichever rank gets
    there first)."""
    if _uses_demo(args):
        ensure_demo_corpus(args.demo_data_dir)
    return build_tokenizer(args)


def main(argv: list[str] | None = None) -> int:
    from arguments import build_run_config, get_args

    def body() -> None:
        args = get_args(argv)
        tokenizer = load_tokenizer(args)
        run = build_run_config(args, tokenizer.vocab_size, tokenizer.eod)
        pretrain(run, model_provider, data_provider, forward_step, pipeline_batch=get_batch_pipe)

    return run_entry_point(body)


if __name__ == "__main__":
    exit_process(main())
