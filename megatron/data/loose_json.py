"""Loose JSON corpora (one ``{"text": ...}`` object per line): reading and tokenising.

The original webtext format. Bad lines name file and line (or are skipped and counted with
``--skip-bad-lines``); empty documents are skipped and counted. ``tokenized_documents`` returns
each document's ids followed by ``<|endoftext|>``; with ``--lazy-loader`` the result is cached
beside the corpus as an indexed dataset built once (by whichever rank gets there first).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson

from megatron.data.cache import load_or_build, make_cache_dir
from megatron.data.documents import InMemoryDocuments
from megatron.data.errors import LooseJSONError
from megatron.data.indexed_dataset import (
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    best_token_dtype,
)
from megatron.tokenizer import AbstractTokenizer

TOKENIZE_BATCH = 512
ORJSON_MAX_OPENINGS = 500  # a line with more '[' and '{' could nest deeper than json reads: json decides
CACHE_VERSION = 1


@dataclass
class ReadStats:
    """What reading a corpus kept and dropped."""

    documents: int = 0
    empty: int = 0
    bad_lines: int = 0

    def summary(self, path: str | os.PathLike) -> str:
        return (f"{path}: {self.documents} documents, {self.empty} empty skipped, "
                f"{self.bad_lines} bad lines skipped")


def parse_json_line(line: bytes, path: str | os.PathLike, number: int, text_key: str,
                    key_flag: str = "--text-key") -> str:
    """The text of one JSON line; raises LooseJSONError naming ``path:number`` (and ``key_flag``,
    the flag that names the key, when the key is missing).

    orjson reads a well-formed line (a third of ``json``'s time; preprocessing spends a tenth of
    its time here). What it refuses or reads differently (invalid UTF-8, lone surrogates, NaN,
    numbers beyond 64 bits, a missing key) falls through to ``json``, which decides as before. So
    does a line that could nest ORJSON_MAX_OPENINGS deep: orjson 3.8 crashes the process at about
    150,000 levels, and ``json`` refuses such a line (too deeply nested), which orjson would not."""
    text = None
    if line.count(b"[") + line.count(b"{") < ORJSON_MAX_OPENINGS:
        try:
            text = orjson.loads(line)[text_key]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            pass
    if type(text) is str:
        return text
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise LooseJSONError(f"{path}:{number}: malformed JSON ({_json_failure(error)}); fix or remove the "
                             "line, or pass --skip-bad-lines to skip and count it") from None
    if not isinstance(record, dict) or text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LooseJSONError(f"{path}:{number}: no {text_key!r} key (found {keys}); set "
                             f"{key_flag} to the field holding the document text")
    text = record[text_key]
    if not isinstance(text, str):
        raise LooseJSONError(f"{path}:{number}: {text_key!r} is a {type(text).__name__}, "
                             "expected a string")
    if (b"\\ud" in line or b"\\uD" in line) and _has_lone_surrogate(text):
        raise LooseJSONError(f"{path}:{number}: {text_key!r} holds a lone surrogate (an unpaired "
                             "\\ud800-\\udfff escape), which is not text; fix or remove the line, "
                             "or pass --skip-bad-lines to skip and count it")
    return text


def _json_failure(error: ValueError | RecursionError) -> str:
    """Why ``json`` refused a line, in a few words."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0][:120]  # e.g. an integer beyond Python's digit limit


def _has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate code point JSON decoded from an unpaired escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_corpus_file(path: str | os.PathLike, flag: str = "--train-data") -> None:
    """Raise LooseJSONError naming ``flag`` unless ``path`` is a readable file (not missing, not a
    directory)."""
    what = "a loose-JSON file (one {\"text\": ...} per line)"
    if flag == "--train-data":
        what += " or a registered corpus name (demo, webtext)"
    if os.path.isdir(path):
        raise LooseJSONError(f"{flag} {path} is a directory; pass {what}")
    if not os.path.isfile(path):
        raise LooseJSONError(f"{flag} {path} does not exist; pass {what}")
    if not os.access(path, os.R_OK):
        raise LooseJSONError(f"{flag} {path} is not readable (permission denied); fix its permissions")


def open_corpus(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading bytes; LooseJSONError naming it if it is missing, a directory or
    unreadable."""
    check_corpus_file(path)
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as error:
        raise LooseJSONError(f"cannot read {path} ({error.strerror}); check the path and its permissions") from None


def iter_json_texts(path: str | os.PathLike, text_key: str = "text", skip_bad_lines: bool = False,
                    stats: ReadStats | None = None) -> Iterator[str]:
    """Non-empty document texts of a loose-JSON file, in file order.

    Blank lines are ignored; whitespace-only documents are skipped and counted in ``stats``.
    Malformed lines raise ``LooseJSONError`` unless ``skip_bad_lines``.
    """
    stats = stats if stats is not None else ReadStats()
    with open_corpus(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = parse_json_line(line, path, number, text_key)
            except LooseJSONError:
                if not skip_bad_lines:
                    raise
                stats.bad_lines += 1
                continue
            if not text.strip():
                stats.empty += 1
                continue
            stats.documents += 1
            yield text


def _tokenized_batches(path: str | os.PathLike, tokenizer: AbstractTokenizer, text_key: str,
                       skip_bad_lines: bool, stats: ReadStats) -> Iterator[list[list[int]]]:
    """Documents' ids, each ending with ``tokenizer.eod``, in batches."""
    texts = iter_json_texts(path, text_key, skip_bad_lines, stats)
    while batch := list(islice(texts, TOKENIZE_BATCH)):
        yield [ids + [tokenizer.eod] for ids in tokenizer.tokenize_batch(batch)]


def tokenize_in_memory(path: str | os.PathLike, tokenizer: AbstractTokenizer,
                       text_key: str = "text", skip_bad_lines: bool = False) -> InMemoryDocuments:
    """Tokenise every document of ``path`` (``eod`` appended) into memory."""
    stats = ReadStats()
    sizes: list[int] = []
    chunks: list[np.ndarray] = []
    for batch in _tokenized_batches(path, tokenizer, text_key, skip_bad_lines, stats):
        sizes.extend(len(ids) for ids in batch)
        chunks.append(np.fromiter(chain.from_iterable(batch), dtype=np.int64))
    print(stats.summary(path), file=sys.stderr)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return InMemoryDocuments(tokens.astype(best_token_dtype(tokenizer.vocab_size)), np.asarray(sizes))


def lazy_cache_dir(path: str | os.PathLike, tokenizer: AbstractTokenizer, text_key: str,
                   skip_bad_lines: bool, cache_dir: str | os.PathLike | None) -> Path:
    """Where ``--lazy-loader`` caches ``path``: keyed by file identity, tokenizer and options."""
    check_corpus_file(path)
    source = Path(path).resolve()
    stat = source.stat()
    key = json.dumps([CACHE_VERSION, str(source), stat.st_size, stat.st_mtime_ns,
                      getattr(tokenizer, "fingerprint", tokenizer.name), text_key, skip_bad_lines])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    parent = Path(cache_dir) if cache_dir else source.parent
    return parent / f"{source.stem}.cache" / f"{digest}"


def _open_cached(target: Path) -> MMapIndexedDataset:
    """The lazy-loader cache in ``target``; raises if it is damaged (see ``MMapIndexedDataset``)."""
    return MMapIndexedDataset(target / "text_document")


def tokenize_cached(path: str | os.PathLike, tokenizer: AbstractTokenizer, text_key: str = "text",
                    skip_bad_lines: bool = False,
                    cache_dir: str | os.PathLike | None = None) -> MMapIndexedDataset:
    """Like ``tokenize_in_memory`` but via an on-disk indexed dataset built once, atomically (and
    rebuilt, with a note, if damaged). Raises LooseJSONError for a missing or unreadable ``path``,
    DataError when the cache directory cannot be written (pass ``cache_dir``)."""
    target = lazy_cache_dir(path, tokenizer, text_key, skip_bad_lines, cache_dir)
    make_cache_dir(target.parent)

    def build(tmp: Path) -> None:
        tmp.mkdir()
        stats = ReadStats()
        builder = IndexedDatasetBuilder(tmp / "text_document.bin", best_token_dtype(tokenizer.vocab_size))
        for batch in _tokenized_batches(path, tokenizer, text_key, skip_bad_lines, stats):
            for ids in batch:
                builder.add_document(ids)
        builder.finalize(tmp / "text_document.idx")
        print(f"built lazy-loader cache {target}: {stats.summary(path)}", file=sys.stderr)

    return load_or_build(target, build, _open_cached)
