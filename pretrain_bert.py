"""Pretrain BERT (masked LM + optional sentence head) on the GPT-2 training loop.

The loop, the Megatron/DeepSpeed seam, checkpoints, logging and reliability features are
``megatron.training.pretrain``'s; this file supplies the model, the batches and the loss.

    torchrun --nproc_per_node 2 pretrain_bert.py --model-parallel-size 2 --train-data demo ...
    deepspeed pretrain_bert.py --deepspeed --deepspeed_config scripts/ds_zero1_config.json ...

The logged ``lm loss`` is the training objective: masked-LM loss plus, with a sentence head,
the sentence (NSP/SOP) cross-entropy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.data.bert_dataset import (
    BATCH_KEYS,
    SENTENCE_HEADS,
    build_bert_data_loader,
    build_bert_datasets,
    demo_wordpiece_path,
    ensure_demo_wordpiece,
)
from megatron.data.masking import MaskingConfig
from megatron.errors import ConfigError
from megatron.model.bert_modeling import BertConfig, BertModel
from megatron.providers import build_data_iterators, exit_process, set_vocab_sizes
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.wordpiece import WORDPIECE_TYPES
from megatron.training import pretrain, print_rank_0, run_entry_point

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


def model_provider(args: argparse.Namespace) -> BertModel:
    print_rank_0(" building BERT model ...")
    config = BertConfig(
        num_layers=args.num_layers, vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, max_sequence_length=args.max_position_embeddings,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        num_tokentypes=args.num_tokentypes, pre_layernorm=args.pre_layernorm,
        binary_head=args.sentence_head != "none", init_method_std=args.init_method_std,
        checkpoint_activations=args.checkpoint_activations, checkpoint_num_layers=args.checkpoint_num_layers)
    model = BertModel(config)
    if mpu.get_data_parallel_rank() == 0:
        count = sum(p.numel() for p in model.parameters())
        print(f" > number of parameters on model parallel rank {mpu.get_model_parallel_rank()}: {count}",
              flush=True)
    return model.to(args.device)


def get_batch(data_iterator: Iterator | None, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Read on model-parallel rank 0 and broadcast to its group: ``BATCH_KEYS`` -> int64 tensors."""
    data = next(data_iterator) if mpu.get_model_parallel_rank() == 0 else None
    batch = mpu.broadcast_data(list(BATCH_KEYS), data, torch.int64)
    return {key: value.to(args.device, non_blocking=True) for key, value in batch.items()}


def forward_step(data_iterator: Iterator | None, model: torch.nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """Masked-LM loss over the selected positions (+ the sentence loss) of one micro batch (0-dim fp32)."""
    batch = get_batch(data_iterator, args)
    lm_logits, binary_logits = model(batch["text"], batch["padding_mask"], batch["types"])
    lm_losses = mpu.vocab_parallel_cross_entropy(lm_logits.contiguous(), batch["labels"], vocab_size=args.vocab_size)
    loss_mask = batch["loss_mask"].float()
    loss = torch.sum(lm_losses * loss_mask) / loss_mask.sum().clamp(min=1.0)
    if binary_logits is not None:
        loss = loss + F.cross_entropy(binary_logits.float(), batch["sentence_label"])
    return loss


def data_provider(args: argparse.Namespace, consumed_samples: int) -> tuple[Any, Any, Any]:
    """Loaders on model-parallel rank 0 of each group; ``args.do_valid``/``do_test`` on all ranks."""
    def build_datasets(args: argparse.Namespace, num_samples: tuple[int, int, int]) -> tuple[Any, Any, Any]:
        return build_bert_datasets(args, build_tokenizer(args), num_samples)

    return build_data_iterators(args, consumed_samples, build_datasets, build_bert_data_loader)


def _uses_demo(args: argparse.Namespace) -> bool:
    demo_dir = os.path.abspath(args.demo_data_dir)
    return os.path.dirname(os.path.abspath(args.vocab_file)) == demo_dir or "demo" in (args.train_data or [])


def resolve_tokenizer(args: argparse.Namespace) -> None:
    """Build the demo corpus and WordPiece vocabulary if used (once, by whichever rank comes first),
    then fix the vocabulary sizes on every rank."""
    if _uses_demo(args):
        ensure_demo_wordpiece(args.demo_data_dir, WORDPIECE_TYPES[args.tokenizer_type])
    set_vocab_sizes(args, build_tokenizer(args))


def main(argv: list[str] | None = None) -> int:
    def run() -> None:
        args = get_bert_args(argv)
        resolve_tokenizer(args)
        pretrain(args, model_provider, data_provider, forward_step)

    return run_entry_point(run)


if __name__ == "__main__":
    exit_process(main())
