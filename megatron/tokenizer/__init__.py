"""Tokenizers: ``build_tokenizer(args)`` picks one from ``--tokenizer-type``."""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

from megatron.errors import ConfigError
from megatron.tokenizer.tokenizer import (
    EOD_TOKEN,
    AbstractTokenizer,
    GPT2BPETokenizer,
    TokenizerFileError,
)
from megatron.tokenizer.wordpiece import WORDPIECE_TYPES, WordPieceTokenizer

TOKENIZER_TYPES = ("GPT2BPETokenizer", *WORDPIECE_TYPES)

__all__ = ["EOD_TOKEN", "TOKENIZER_TYPES", "AbstractTokenizer", "GPT2BPETokenizer",
           "TokenizerFileError", "TokenizerSource", "WordPieceTokenizer", "build_tokenizer",
           "tokenizer_fingerprint", "tokenizer_identity"]


class TokenizerSource(Protocol):
    """Where a tokenizer comes from (``DataConfig`` is one): ``--tokenizer-type``, ``--vocab-file``
    and, for GPT-2's BPE, ``--merge-file``."""

    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None


def build_tokenizer(args: TokenizerSource) -> AbstractTokenizer:
    """Tokenizer named by ``args.tokenizer_type`` from ``args.vocab_file``/``args.merge_file``.

    Raises ``ConfigError`` (``TokenizerFileError``) when the files are missing or mismatched.
    """
    tokenizer_type = args.tokenizer_type
    if tokenizer_type in WORDPIECE_TYPES:
        if not args.vocab_file:
            raise ConfigError(f"{tokenizer_type} needs --vocab-file (a BERT vocab.txt; "
                             "`python tools/train_wordpiece.py` trains one)")
        return WordPieceTokenizer(args.vocab_file, lowercase=WORDPIECE_TYPES[tokenizer_type])
    if tokenizer_type != "GPT2BPETokenizer":
        raise ConfigError(f"--tokenizer-type {tokenizer_type} is not supported; "
                         f"choose one of {', '.join(TOKENIZER_TYPES)}")
    if not args.vocab_file or not args.merge_file:
        raise ConfigError("GPT2BPETokenizer needs --vocab-file and --merge-file (GPT-2's vocab.json "
                         "and merges.txt, or data/demo/gpt2-vocab.json and data/demo/gpt2-merges.txt "
                         "from `python tools/build_demo_corpus.py`)")
    return GPT2BPETokenizer(args.vocab_file, args.merge_file)


def _canonical(path: str) -> bytes:
    """What in a tokenizer file decides the tokenization: a JSON vocabulary's mapping (not its
    formatting), else the lines without line-end whitespace, trailing empty lines or GPT-2's
    ``#version`` header (a line's position is a token id, so no other line is dropped).
    Unreadable content is taken as it is."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    if path.endswith(".json"):
        try:
            return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError):
            return data
    lines = [line.rstrip("\r\n \t") for line in text.splitlines()]
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return "\n".join(lines).rstrip("\n").encode("utf-8")


def tokenizer_fingerprint(args: TokenizerSource) -> str:
    """SHA-256 of the tokenizer's type and files (vocab, and merges for GPT-2's BPE), by content
    that decides the tokenization (``_canonical``: re-formatting a file keeps it): the identity a
    checkpoint records, so that a run never resumes with another vocabulary. Empty when the
    files are not given."""
    paths = [args.vocab_file] + ([args.merge_file] if args.tokenizer_type == "GPT2BPETokenizer" else [])
    if not all(paths):
        return ""
    digest = hashlib.sha256(args.tokenizer_type.encode())
    for path in paths:
        digest.update(hashlib.sha256(_canonical(path)).digest())
    return digest.hexdigest()


def tokenizer_identity(args: TokenizerSource, tokenizer: AbstractTokenizer) -> dict[str, int | str]:
    """What a checkpoint records of its tokenizer (``megatron.checkpoint.layout.TOKENIZER_KEYS``)."""
    return {"vocab_size": tokenizer.vocab_size, "eod_token": tokenizer.eod,
            "tokenizer_sha256": tokenizer_fingerprint(args)}
