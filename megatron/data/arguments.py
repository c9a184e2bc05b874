"""Command-line arguments of the data pipeline, the ``DataConfig`` they build, and its
start-up validation."""

from __future__ import annotations

import argparse
import dataclasses
import os

from megatron.data.builder import CORPORA, parse_data_path, parse_split, resolve_corpus
from megatron.data.config import DataConfig
from megatron.data.indexed_dataset import check_prefix_files
from megatron.data.loose_json import check_corpus_file
from megatron.errors import ConfigError
from megatron.tokenizer import TOKENIZER_TYPES


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the 'data' argument group to ``parser``; returns ``parser``."""
    group = parser.add_argument_group("data", "training data and tokenizer")
    group.add_argument("--train-data", nargs="+", default=None,
                       help="loose-JSON file(s), or a registered corpus name "
                            f"({', '.join(['demo', *CORPORA])}); webtext resolves under --data-dir")
    group.add_argument("--valid-data", nargs="+", default=None,
                       help="loose-JSON validation file(s); with it --split is ignored")
    group.add_argument("--test-data", nargs="+", default=None, help="loose-JSON test file(s)")
    group.add_argument("--data-dir", default="data", help="where registered corpora live")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="prefix of a preprocessed .bin/.idx pair, or a weighted blend such as "
                            "`0.3 A 0.7 B`")
    group.add_argument("--text-key", default="text", help="JSON key holding the document text")
    group.add_argument("--lazy-loader", action="store_true",
                       help="tokenise loose JSON once into a cache beside the file (or --cache-dir)")
    group.add_argument("--split", default="949,50,1",
                       help="train,valid,test proportions of the documents")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--seq-length", type=int, default=1024, help="tokens per sample")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip and count malformed JSON lines instead of stopping")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    group.add_argument("--cache-dir", default=None,
                       help="where lazy-loader and sample-index caches go (default: beside the data)")
    group.add_argument("--demo-data-dir", default="data/demo",
                       help="where the built-in demo corpus is built on first use")
    return parser


def data_config(args: argparse.Namespace, seed: int) -> DataConfig:
    """The ``DataConfig`` of parsed flags (every field is a flag of ``add_data_args``)."""
    names = [field.name for field in dataclasses.fields(DataConfig) if field.name != "seed"]
    return DataConfig(**{name: getattr(args, name) for name in names}, seed=seed)


def _check_files(args: DataConfig) -> None:
    files = (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file))
    if args.tokenizer_type != "GPT2BPETokenizer":
        files = files[:1]  # WordPiece: one vocab.txt, no merges
    for flag, path in files:
        if not path:
            raise ConfigError(f"{flag} is required for --tokenizer-type {args.tokenizer_type}; use "
                             "GPT-2's files or data/demo/gpt2-vocab.json + gpt2-merges.txt from "
                             "`python tools/build_demo_corpus.py`")
        if os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a directory; pass the tokenizer file itself (e.g. "
                              f"{os.path.join(path, 'vocab.json' if 'vocab' in flag else 'merges.txt')})")
        if not os.path.isfile(path) and not _is_demo_tokenizer(args, path):
            raise ConfigError(f"{flag} {path} does not exist; fix the path, or build the demo "
                             "tokenizer with `python tools/build_demo_corpus.py`")


def _check_data_files(args: DataConfig) -> None:
    """Raise DataError unless every loose-JSON file and ``--data-path`` prefix is there (the demo
    corpus is built on first use, so is not checked)."""
    for flag, names in (("--train-data", args.train_data), ("--valid-data", args.valid_data),
                        ("--test-data", args.test_data)):
        for name in names or []:
            if name != "demo":
                check_corpus_file(resolve_corpus(name, args), flag)
    for _, prefix in parse_data_path(args.data_path) if args.data_path else []:
        check_prefix_files(prefix)


def _check_cache_dir(cache_dir: str | None) -> None:
    """Raise ConfigError unless ``--cache-dir`` is, or can be created as, a writable directory."""
    if not cache_dir:
        return
    place = os.path.abspath(cache_dir)
    while not os.path.exists(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    if not os.path.isdir(place):
        raise ConfigError(f"--cache-dir {cache_dir}: {place} is a file, not a directory; pass a directory")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigError(f"--cache-dir {cache_dir}: {place} is not writable; pass a writable directory")


def _is_demo_tokenizer(args: DataConfig, path: str) -> bool:
    """True for the demo's files, which are built on first use (so may not exist yet)."""
    demo_dir = os.path.abspath(args.demo_data_dir)
    return os.path.dirname(os.path.abspath(path)) == demo_dir


def validate_data_args(args: DataConfig) -> None:
    """Raise ConfigError with the bad value and the fix for any inconsistent data argument, or a
    data, tokenizer or cache path that is missing, a directory where a file belongs, or unusable."""
    if not args.train_data and not args.data_path:
        raise ConfigError("no training data: pass --train-data (loose JSON or a corpus name such as "
                         "demo or webtext) or --data-path (prefix of a preprocessed .bin/.idx)")
    if args.train_data and args.data_path:
        raise ConfigError("pass either --train-data or --data-path, not both")
    if args.data_path is not None:
        if not args.data_path:
            raise ConfigError("--data-path needs a prefix or weight/prefix pairs")
        parse_data_path(args.data_path)
    parse_split(args.split)
    if args.seq_length <= 0:
        raise ConfigError(f"--seq-length must be positive, got {args.seq_length}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(f"--tokenizer-type {args.tokenizer_type} is not one of {TOKENIZER_TYPES}")
    _check_files(args)
    _check_data_files(args)
    _check_cache_dir(args.cache_dir)
