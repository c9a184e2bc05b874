"""Pretrain BERT (masked LM + optional sentence head) on the GPT-2 training loop.

The loop, the Megatron/DeepSpeed seam, checkpoints, logging and reliability features are
``megatron.training.loop.pretrain``'s; this file supplies the model, the batches and the loss.

    torchrun --nproc_per_node 2 pretrain_bert.py --model-parallel-size 2 --train-data demo ...
    deepspeed pretrain_bert.py --deepspeed --deepspeed_config scripts/ds_zero1_config.json ...

The logged ``lm loss`` is the training objective: masked-LM loss plus, with a sentence head,
the sentence (NSP/SOP) cross-entropy.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.config import RunConfig
from megatron.data.bert_dataset import (
    BATCH_KEYS,
    SENTENCE_HEADS,
    BertSampleConfig,
    build_bert_data_loader,
    build_bert_datasets,
    demo_wordpiece_path,
    ensure_demo_wordpiece,
)
from megatron.data.masking import MaskingConfig
from megatron.errors import ConfigError
from megatron.model.bert_modeling import BertConfig, BertModel
from megatron.tokenizer import AbstractTokenizer, build_tokenizer
from megatron.tokenizer.wordpiece import WORDPIECE_TYPES
from megatron.training.data import DataIterators, DataPosition, build_data_iterators
from megatron.training.entry import exit_process, run_entry_point
from megatron.training.log import print_rank_0
from megatron.training.loop import pretrain

GPT2_ONLY_FLAGS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")


def add_bert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """BERT's flags; also makes WordPiece (the demo's 8000-token vocab by default) the tokenizer."""
    group = parser.add_argument_group("bert", "BERT pretraining")
    group.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens selected for the masked LM")
    group.add_argument("--random-replace-prob", type=float, default=0.1,
                       help="of the selected tokens, the fraction replaced by a random token")
    group.add_argument("--unmask-replace-prob", type=float, default=0.1,
                       help="of the selected tokens, the fraction left unchanged")
    group.add_argument("--sentence-head", default="sop", choices=SENTENCE_HEADS,
                       help="binary head on [CLS]: sentence-order (sop), next-sentence (nsp) or none")
    group.add_argument("--pre-layernorm", action="store_true",
                       help="pre-LayerNorm blocks with a final LayerNorm (default: BERT's post-LayerNorm)")
    group.add_argument("--num-tokentypes", type=int, default=2,
                       help="token-type (segment) embeddings; 0 for none (RoBERTa)")
    parser.set_defaults(tokenizer_type="BertWordPieceLowerCase")
    return parser


def validate_bert_args(args: argparse.Namespace) -> None:
    """Raise ConfigError naming the flag for BERT-specific mistakes; warn about ignored flags."""
    if args.tokenizer_type not in WORDPIECE_TYPES:
        raise ConfigError(f"--tokenizer-type {args.tokenizer_type} is not a WordPiece tokenizer; BERT needs "
                          f"one of {', '.join(WORDPIECE_TYPES)}")
    MaskingConfig(args.mask_prob, args.random_replace_prob, args.unmask_replace_prob).validate()
    if args.seq_length < 4:
        raise ConfigError(f"--seq-length ({args.seq_length}) must be at least 4 for [CLS] A [SEP] B [SEP]")
    if args.num_tokentypes < 0:
        raise ConfigError(f"--num-tokentypes must be >= 0, got {args.num_tokentypes}")
    if args.pipe_parallel_size > 1:
        raise ConfigError(f"--pipe-parallel-size {args.pipe_parallel_size}: BERT is not pipelined; drop the flag "
                          "(tensor and data parallelism work)")
    ignored = ["--" + name.replace("_", "-") for name in GPT2_ONLY_FLAGS if getattr(args, name)]
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"warning: {', '.join(ignored)} apply to GPT-2 only and are ignored by BERT", file=sys.stderr)


def get_bert_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate GPT-2's flags plus BERT's; ``--vocab-file`` defaults to the demo's."""
    from arguments import build_parser, validate_args

    args = add_bert_args(build_parser()).parse_args(argv)
    if args.vocab_file is None and args.tokenizer_type in WORDPIECE_TYPES:
        args.vocab_file = str(demo_wordpiece_path(args.demo_data_dir, WORDPIECE_TYPES[args.tokenizer_type]))
    validate_args(args)
    validate_bert_args(args)
    return args


@dataclass(frozen=True)
class BertOptions:
    """BERT's own flags: what a sample looks like and the architecture's variants."""

    sample: BertSampleConfig
    pre_layernorm: bool = False
    num_tokentypes: int = 2


def bert_options(args: argparse.Namespace) -> BertOptions:
    masking = MaskingConfig(args.mask_prob, args.random_replace_prob, args.unmask_replace_prob)
    return BertOptions(BertSampleConfig(args.seq_length, args.seed, args.sentence_head, masking),
                       pre_layernorm=args.pre_layernorm, num_tokentypes=args.num_tokentypes)


def model_provider(run: RunConfig, options: BertOptions) -> BertModel:
    print_rank_0(" building BERT model ...")
    model_config = run.model
    config = BertConfig(
        num_layers=model_config.num_layers, vocab_size=model_config.padded_vocab_size,
        hidden_size=model_config.hidden_size, num_attention_heads=model_config.num_attention_heads,
        max_sequence_length=model_config.max_position_embeddings, hidden_dropout=model_config.hidden_dropout,
        attention_dropout=model_config.attention_dropout, num_tokentypes=options.num_tokentypes,
        pre_layernorm=options.pre_layernorm, binary_head=options.sample.sentence_head != "none",
        init_method_std=model_config.init_method_std, checkpoint_activations=model_config.checkpoint_activations,
        checkpoint_num_layers=model_config.checkpoint_num_layers)
    model = BertModel(config)
    if mpu.get_data_parallel_rank() == 0:
        count = sum(p.numel() for p in model.parameters())
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}: {count}",
              flush=True)
    return model.to(run.device)


def get_batch(data_iterator: Iterator | None, run: RunConfig) -> dict[str, torch.Tensor]:
    """Read on model-parallel rank 0 and broadcast to its group: ``BATCH_KEYS`` -> int64 tensors."""
    data = next(data_iterator) if mpu.get_model_parallel_rank() == 0 else None
    batch = mpu.broadcast_data(list(BATCH_KEYS), data, torch.int64)
    return {key: value.to(run.device, non_blocking=True) for key, value in batch.items()}


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module, run: RunConfig) -> torch.Tensor:
    """Masked-LM loss over the selected positions (+ the sentence loss) of one micro batch (0-dim fp32)."""
    batch = get_batch(data_iterator, run)
    lm_logits, binary_logits = model(batch["text"], batch["padding_mask"], batch["types"])
    lm_losses = mpu.vocab_parallel_cross_entropy(lm_logits.contiguous(), batch["labels"],
                                                 vocab_size=run.model.vocab_size)
    loss_mask = batch["loss_mask"].float()
    loss = torch.sum(lm_losses * loss_mask) / loss_mask.sum().clamp(min=1.0)
    if binary_logits is not None:
        loss = loss + F.cross_entropy(binary_logits.float(), batch["sentence_label"])
    return loss


def data_provider(run: RunConfig, position: DataPosition, options: BertOptions) -> DataIterators:
    """Loaders on model-parallel rank 0 of each group (the others get their batches by broadcast)."""
    def build_datasets(run: RunConfig, num_samples: tuple[int, int, int]) -> tuple[Any, Any, Any]:
        return build_bert_datasets(run.data, options.sample, build_tokenizer(run.data), num_samples)

    return build_data_iterators(run, position, build_datasets, build_bert_data_loader)


def _uses_demo(args: argparse.Namespace) -> bool:
    demo_dir = os.path.abspath(args.demo_data_dir)
    return os.path.dirname(os.path.abspath(args.vocab_file)) == demo_dir or "demo" in (args.train_data or [])


def load_tokenizer(args: argparse.Namespace) -> AbstractTokenizer:
    """The WordPiece tokenizer; builds the demo corpus and vocabulary first if they are used (once,
    by whichever rank comes first)."""
    if _uses_demo(args):
        ensure_demo_wordpiece(args.demo_data_dir, WORDPIECE_TYPES[args.tokenizer_type])
    return build_tokenizer(args)


def main(argv: list[str] | None = None) -> int:
    from arguments import build_run_config

    def body() -> None:
        args = get_bert_args(argv)
        tokenizer = load_tokenizer(args)
        run = build_run_config(args, tokenizer.vocab_size, tokenizer.eod)
        options = bert_options(args)
        pretrain(run, functools.partial(model_provider, options=options),
                 functools.partial(data_provider, options=options), forward_step)

    return run_entry_point(body)


if __name__ == "__main__":
    exit_process(main())
