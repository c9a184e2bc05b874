"""Tokenizers for GPT-2 pretraining: the abstract contract and GPT-2's byte-level BPE.

``GPT2BPETokenizer`` reads GPT-2's two files (``vocab.json``, ``merges.txt``) and encodes with
``tiktoken`` (Rust), or with Hugging Face ``tokenizers`` for merge lists tiktoken cannot reproduce
(``tiktoken_bpe``). Its ids equal GPT-2's published byte-level BPE for any Unicode text;
``tests/unit/tokenizer`` checks that against ``tools/reference_gpt2_bpe.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from megatron.errors import ConfigError
from megatron.tokenizer.pretokenize import gpt2_split_pattern
from megatron.tokenizer.tiktoken_bpe import TiktokenBPE, TiktokenRanks, tiktoken_ranks

EOD_TOKEN = "<|endoftext|>"


class TokenizerFileError(ConfigError):
    """The vocab/merges files are missing, malformed, or do not belong together."""


class AbstractTokenizer(ABC):
    """What training and data code rely on: ids are ``int`` in ``[0, vocab_size)``."""

    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """True (unpadded) vocabulary size."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id of the end-of-document token."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text; subclasses may do this faster than one at a time."""
        return [self.tokenize(text) for text in texts]

    def tokenize_batch_numpy(self, texts: Sequence[str], dtype: type) -> list[np.ndarray]:
        """Ids of each text as a ``dtype`` array (what preprocessing writes); subclasses may skip
        the Python lists."""
        return [np.asarray(ids, dtype) for ids in self.tokenize_batch(texts)]


def unreadable_file_error(flag: str, path: str | os.PathLike, error: OSError) -> TokenizerFileError:
    """The error for a tokenizer file that exists but cannot be read (a directory, no permission)."""
    if os.path.isdir(path):
        return TokenizerFileError(f"{flag} {path} is a directory; pass the tokenizer file itself")
    return TokenizerFileError(f"{flag} {path} cannot be read ({error.strerror or error}); check its permissions")


def _read_vocab(vocab_file: str, merge_file: str) -> dict[str, int]:
    """Token -> id from GPT-2's ``vocab.json``."""
    try:
        with open(vocab_file, encoding="utf-8") as handle:
            vocab = json.load(handle)
    except FileNotFoundError:
        raise TokenizerFileError(
            f"--vocab-file {vocab_file} does not exist; pass GPT-2's vocab.json, or build the demo "
            "tokenizer with `python tools/build_demo_corpus.py`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"--vocab-file {vocab_file} is not a JSON vocab ({error}); "
                                 f"it should be the vocab.json that goes with {merge_file}") from None
    except OSError as error:
        raise unreadable_file_error("--vocab-file", vocab_file, error) from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFileError(f"--vocab-file {vocab_file} must map token strings to int ids")
    return vocab


def _read_merges(merge_file: str) -> list[tuple[str, str]]:
    """Merge pairs in rank order from GPT-2's ``merges.txt`` (``#version`` header optional)."""
    try:
        with open(merge_file, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except FileNotFoundError:
        raise TokenizerFileError(
            f"--merge-file {merge_file} does not exist; pass GPT-2's merges.txt, or build the demo "
            "tokenizer with `python tools/build_demo_corpus.py`") from None
    except UnicodeDecodeError as error:
        raise TokenizerFileError(f"--merge-file {merge_file} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); is this GPT-2's merges.txt?") from None
    except OSError as error:
        raise unreadable_file_error("--merge-file", merge_file, error) from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise TokenizerFileError(f"{merge_file}:{number}: expected two symbols separated by "
                                     f"one space, got {line!r}; is this GPT-2's merges.txt?")
        merges.append((pair[0], pair[1]))
    if not merges:
        raise TokenizerFileError(f"--merge-file {merge_file} holds no merges (an empty file, or only the "
                                 "#version line); pass GPT-2's merges.txt")
    return merges


def _check_files_match(vocab: dict[str, int], merges: list[tuple[str, str]],
                       vocab_file: str, merge_file: str) -> None:
    """Raise TokenizerFileError unless every byte symbol and every merge result is in the vocab."""
    hint = (f"--vocab-file {vocab_file} and --merge-file {merge_file} do not belong together; "
            "pass the vocab.json and merges.txt written by the same tokenizer training")
    missing_bytes = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing_bytes:
        raise TokenizerFileError(f"{hint} (byte symbols {missing_bytes[:5]} are not in the vocab)")
    for rank, (first, second) in enumerate(merges):
        if first + second not in vocab or first not in vocab or second not in vocab:
            raise TokenizerFileError(f"{hint} (merge {rank} {first!r} + {second!r} is not in the vocab)")
    if EOD_TOKEN not in vocab:
        raise TokenizerFileError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} token; GPT-2 "
                                 "pretraining needs it between documents")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerFileError(f"--vocab-file {vocab_file}: ids must be 0..{len(vocab) - 1} "
                                 "without gaps or repeats")


def _file_digest(*paths: str) -> str:
    """SHA-256 over the contents of ``paths`` (identifies a tokenizer for cache keys)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def hf_encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, special tokens neither added nor recognised."""
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nobody here reads:
    # about 1.45x the throughput of encode_batch on the demo corpus, the same ids.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]


class HFTokenizerBackend(AbstractTokenizer):
    """Encoding and decoding through a Hugging Face ``tokenizers.Tokenizer`` in ``self._tokenizer``
    (special tokens are neither added nor skipped: ids map one to one to text)."""

    _tokenizer: Tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return hf_encode_batch(self._tokenizer, texts)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


BACKENDS = ("auto", "tokenizers")


class GPT2BPETokenizer(AbstractTokenizer):
    """GPT-2's byte-level BPE from ``vocab_file`` + ``merge_file``, encoded in Rust.

    No prefix space is added and ``<|endoftext|>`` inside text is ordinary text, as in GPT-2;
    ``eod`` is its id, for the data pipeline to insert between documents. ``backend="auto"``
    encodes with tiktoken when its rank order reproduces the merges (``tiktoken_bpe``; true of
    trained vocabularies), else with Hugging Face ``tokenizers`` and a warning saying why;
    ``"tokenizers"`` always uses the latter (the benchmark's comparison). ``self.backend`` says which.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        vocab = _read_vocab(vocab_file, merge_file)
        merges = _read_merges(merge_file)
        _check_files_match(vocab, merges, vocab_file, merge_file)
        self.vocab_file, self.merge_file = os.fspath(vocab_file), os.fspath(merge_file)
        self.fingerprint = _file_digest(vocab_file, merge_file)
        self._vocab_size = len(vocab)
        self._eod = vocab[EOD_TOKEN]
        self._requested_backend = backend
        self.backend, self._encoder = _build_encoder(vocab, merges, backend, self)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encoder.encode_batch(texts)

    def tokenize_batch_numpy(self, texts: Sequence[str], dtype: type) -> list[np.ndarray]:
        if isinstance(self._encoder, TiktokenBPE):
            encode = self._encoder.encode_array
            return [encode(text).astype(dtype, copy=False) for text in texts]
        return super().tokenize_batch_numpy(texts, dtype)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._encoder.decode(ids)

    def __getstate__(self) -> dict:
        # Rebuilding from the files keeps DataLoader workers light.
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file,
                "backend": self._requested_backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["merge_file"], state.get("backend", "auto"))


_CHECKED_RANKS: dict[str, TiktokenRanks | str] = {}  # by file digest: forked workers skip the check


def _build_encoder(vocab: dict[str, int], merges: list[tuple[str, str]], backend: str,
                   files: GPT2BPETokenizer) -> tuple[str, TiktokenBPE | _HFBPE]:
    """``("tiktoken", encoder)`` unless ``backend`` is "tokenizers" or tiktoken cannot reproduce
    the merges (then a warning says why), else ``("tokenizers", encoder)``."""
    if backend == "tokenizers":
        return "tokenizers", _HFBPE(vocab, merges)
    ranks = _CHECKED_RANKS.get(files.fingerprint)
    if ranks is None:
        if len(_CHECKED_RANKS) >= 4:
            _CHECKED_RANKS.clear()
        ranks = _CHECKED_RANKS[files.fingerprint] = tiktoken_ranks(vocab, merges)
    if isinstance(ranks, str):
        warnings.warn(f"{files.merge_file}: encoding with Hugging Face tokenizers, not tiktoken, "
                      f"whose rank order would change the ids: {ranks}", stacklevel=3)
        return "tokenizers", _HFBPE(vocab, merges)
    return "tiktoken", TiktokenBPE(vocab, ranks, gpt2_split_pattern())


class _HFBPE:
    """GPT-2's BPE in Hugging Face ``tokenizers``, which merges by pair as GPT-2 does."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self._tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gpt2_split_pattern()), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._tokenizer.decoder = decoders.ByteLevel()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return hf_encode_batch(self._tokenizer, texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)
