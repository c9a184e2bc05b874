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
from megatron.data import build_data_loader, build_train_valid_test_datasets
from megatron.data.demo import ensure_demo_corpus
from megatron.model import GPT2Model
from megatron.model.gpt2_pipe import PipelineDescription, gpt2_pipeline_description
from megatron.providers import build_data_iterators, exit_process, set_vocab_sizes
from megatron.tokenizer import build_tokenizer
from megatron.training import pretrain, print_rank_0, run_entry_point


def model_provider(args: argparse.Namespace) -> GPT2Model | PipelineDescription:
    print_rank_0(" building GPT2 model ...")
    if args.pipe_parallel_size > 1:
        description = gpt2_pipeline_description(
            num_layers=args.num_layers, vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, embedding_dropout_prob=args.hidden_dropout,
            attention_dropout_prob=args.attention_dropout, output_dropout_prob=args.hidden_dropout,
            max_sequence_length=args.max_position_embeddings, true_vocab_size=args.vocab_size,
            init_method_std=args.init_method_std)
        description.extras["batch_fn"] = get_batch_pipe
        return description
    model = GPT2Model(num_layers=args.num_layers, vocab_size=args.padded_vocab_size,
                      hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                      embedding_dropout_prob=args.hidden_dropout, attention_dropout_prob=args.attention_dropout,
                      output_dropout_prob=args.hidden_dropout, max_sequence_length=args.max_position_embeddings,
                      checkpoint_activations=args.checkpoint_activations,
                      checkpoint_num_layers=args.checkpoint_num_layers, parallel_output=True,
                      init_method_std=args.init_method_std)
    if mpu.get_data_parallel_rank() == 0:
        count = sum(p.numel() for p in model.parameters())
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}: {count}",
              flush=True)
    return model.to(args.device)


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


def get_batch(data_iterator: Iterator | None, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Read on model-parallel rank 0, broadcast to the group, build inputs/labels/masks."""
    data = next(data_iterator) if mpu.get_model_parallel_rank() == 0 else None
    text = mpu.broadcast_data(["text"], data, torch.int64)["text"].to(args.device, non_blocking=True)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    attention_mask, loss_mask, position_ids = get_masks_and_position_ids(
        tokens, args.eod_token, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
    return tokens, labels, loss_mask, attention_mask, position_ids


def get_batch_pipe(data_iterator: Iterator | None, args: argparse.Namespace) -> tuple[Any, Any]:
    """A micro batch for the pipeline engine: ``(tokens, (labels, loss_mask))``."""
    tokens, labels, loss_mask, _, _ = get_batch(data_iterator, args)
    return tokens, (labels, loss_mask)


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """Mean language-model loss of one micro batch (a 0-dim fp32 tensor)."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, args)
    logits = model(tokens, position_ids, attention_mask)
    losses = mpu.vocab_parallel_cross_entropy(logits.contiguous(), labels, vocab_size=args.vocab_size)
    return torch.sum(losses * loss_mask) / loss_mask.sum()


def data_provider(args: argparse.Namespace, consumed_samples: int) -> tuple[Any, Any, Any]:
    """Loaders on model-parallel rank 0 of each group; ``args.do_valid``/``do_test`` on all ranks."""
    def build_datasets(args: argparse.Namespace, num_samples: tuple[int, int, int]) -> tuple[Any, Any, Any]:
        return build_train_valid_test_datasets(args, build_tokenizer(args), num_samples)

    return build_data_iterators(args, consumed_samples, build_datasets, build_data_loader)


def _uses_demo(args: argparse.Namespace) -> bool:
    demo_dir = os.path.abspath(args.demo_data_dir)
    in_demo = [p for p in (args.vocab_file, args.merge_file) if p and os.path.dirname(os.path.abspath(p)) == demo_dir]
    return bool(in_demo) or "demo" in (args.train_data or [])


def resolve_tokenizer(args: argparse.Namespace) -> None:
    """Build the demo corpus if it is used (once, whichever rank gets there first), then fix the
    vocabulary sizes on every rank."""
    if _uses_demo(args):
        ensure_demo_corpus(args.demo_data_dir)
    set_vocab_sizes(args, build_tokenizer(args))


def main(argv: list[str] | None = None) -> int:
    from arguments import get_args

    def run() -> None:
        args = get_args(argv)
        resolve_tokenizer(args)
        pretrain(args, model_provider, data_provider, forward_step)

    return run_entry_point(run)


if __name__ == "__main__":
    exit_process(main())
