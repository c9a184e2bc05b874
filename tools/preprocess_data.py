"""Tokenise a loose-JSON corpus into Megatron mmap indexed datasets.

    python tools/preprocess_data.py --input X.json --output-prefix P --vocab-file V \\
        --merge-file M --tokenizer-type GPT2BPETokenizer --append-eod --workers N [--json-keys text]

Writes ``P_{key}_document.bin``/``.idx`` per JSON key (uint16 tokens when the vocab has fewer
than 65500 ids, else int32), with a progress bar and a closing throughput line. Outputs appear
only when complete, and never for an input without a single document of text. User mistakes
(``ConfigError``: a missing or empty input, a bad line, a tokenizer file, an unwritable output
directory) exit 2 with a one-line message and write nothing. A full output disk, or a worker that
dies mid-run (the out-of-memory killer), exits 1 with one line naming it; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data.errors import DataError, LooseJSONError  # noqa: E402
from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    best_token_dtype,
    data_file_path,
    index_file_path,
)
from megatron.data.loose_json import check_corpus_file, parse_json_line  # noqa: E402
from megatron.data.worker_pool import WorkerDied, ordered_map  # noqa: E402
from megatron.errors import ConfigError, TrainingAborted  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES, AbstractTokenizer, build_tokenizer  # noqa: E402
from megatron.training.entry import run_entry_point  # noqa: E402

# Half a megabyte per task: at 64 KB the parent's share of the work (sending tasks, receiving
# results) was twice as large, and on a machine with as many workers as cores it competes with them.
# A task names its bytes (offset, length) and the worker reads them: the parent no longer sends
# the corpus through the workers' pipes (that took the parent a third of a core at 30 MB/s).
BYTES_PER_TASK = 1 << 19


@dataclass
class Stats:
    """Counts of one preprocessing run."""

    documents: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    bad_lines: int = 0
    bytes: int = 0
    seconds: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) per task written

    def throughput_line(self) -> str:
        megabytes = self.bytes / 1e6
        rate = max(self.seconds, 1e-9)
        return (f"processed {self.documents} documents ({megabytes:.2f} MB) in {self.seconds:.2f} s: "
                f"{megabytes / rate:.2f} MB/s, {self.documents / rate:.0f} docs/s "
                f"({sum(self.empty.values())} empty texts, {self.bad_lines} bad lines skipped)")


@dataclass
class EncodedBlock:
    """One task's result, compact to send back from a worker: its number of lines; per non-blank
    line its size in bytes; the bad lines' messages by line index, each with its line number in
    the block (``path:N:`` in the message; the parent, which knows where the block starts, puts
    the file's number there); per key, the valid records' token counts (0: an empty text) and all
    their ids back to back (a few arrays, not one object per document)."""

    lines: int
    sizes: list[int]
    errors: dict[int, tuple[int, str]]
    lengths: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change while the input is read: the file (device, inode), its size and time."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _read_block(path: str, identity: tuple[int, int, int, int], offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of ``path``, refused (DataError) if the file is no longer the
    one the blocks were cut from: blocks of two versions would be mixed silently."""
    with open(path, "rb") as handle:
        if _identity(os.fstat(handle.fileno())) != identity:
            raise DataError(f"{path} changed while it was being preprocessed (replaced, written to or "
                            "truncated); nothing was written: run again on a file that stays unchanged")
        handle.seek(offset)
        return handle.read(length)


def encode_block(task: tuple[str, tuple[int, int, int, int], int, int, list[str], bool, type],
                 tokenizer: AbstractTokenizer) -> EncodedBlock:
    """Read a block of whole lines (``length`` bytes at ``offset``), split, parse and encode them."""
    path, identity, offset, length, keys, append_eod, dtype = task
    lines = _read_block(path, identity, offset, length).split(b"\n")
    # b"" after a final newline; else the last piece is the file's last line, without a newline
    unterminated = len(lines) if lines[-1] else 0
    if not lines[-1]:
        lines.pop()
    sizes: list[int] = []
    errors: dict[int, tuple[int, str]] = {}
    texts: dict[str, list[str]] = {key: [] for key in keys}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        index = len(sizes)
        sizes.append(len(line) + (number != unterminated))
        try:
            record = [parse_json_line(line, path, number, key, "--json-keys") for key in keys]
        except LooseJSONError as error:
            errors[index] = (number, str(error))
            continue
        for key, text in zip(keys, record):
            texts[key].append(text if text.strip() else "")
    lengths, ids = {}, {}
    for key in keys:
        lengths[key], ids[key] = _encode(tokenizer, texts[key], append_eod, dtype)
    return EncodedBlock(len(lines), sizes, errors, lengths, ids)


def _encode(tokenizer: AbstractTokenizer, texts: list[str], append_eod: bool,
            dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(token count per text, all ids back to back), ``<|endoftext|>`` after each non-empty text
    when ``append_eod``: numpy arrays, which pickle compactly on the way back from a worker."""
    encoded = tokenizer.tokenize_batch_numpy(texts, dtype)
    lengths = np.fromiter((array.size for array in encoded), np.int64, len(encoded))
    if append_eod:
        eod = np.array([tokenizer.eod], dtype)
        encoded = [part for array in encoded if array.size for part in (array, eod)]
        lengths += lengths > 0
    return lengths, np.concatenate(encoded) if encoded else np.zeros(0, dtype)


def _tasks(path: str, keys: list[str], append_eod: bool, dtype: type) -> Iterator[tuple]:
    """Blocks of about ``BYTES_PER_TASK`` of whole lines, as (offset, length): the parent only
    finds where each block's last line ends; workers read, split and parse."""
    with open(path, "rb") as handle:
        identity = _identity(os.fstat(handle.fileno()))
        size, offset = identity[2], 0
        while offset < size:
            handle.seek(offset + BYTES_PER_TASK - 1)
            handle.readline()  # to the end of the line holding the block's last byte
            end = min(handle.tell(), size)
            yield path, identity, offset, end - offset, keys, append_eod, dtype
            offset = end


def _results(path: str, keys: list[str], append_eod: bool, workers: int, dtype: type,
             tokenizer: AbstractTokenizer) -> Iterator[EncodedBlock]:
    """Encoded tasks in file order: in this process for one worker, else in forked workers that
    inherit ``tokenizer`` instead of building one (a worker that dies is an error, not a hang)."""
    encode = functools.partial(encode_block, tokenizer=tokenizer)
    tasks = _tasks(path, keys, append_eod, dtype)
    if workers == 1:
        return (encode(task) for task in tasks)
    return ordered_map(encode, tasks, workers, what="preprocessing worker")


def _check_inputs(path: str, workers: int) -> None:
    """Raise ConfigError for a missing/unreadable ``--input`` or a bad ``--workers``."""
    check_corpus_file(path, "--input")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")


def _open_builders(partial: dict[str, str], dtype: type) -> dict[str, IndexedDatasetBuilder]:
    """A builder per key writing ``{partial prefix}.bin``; DataError if the directory is unusable."""
    directory = os.path.dirname(os.path.abspath(next(iter(partial.values()))))
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        os.makedirs(directory, exist_ok=True)
        for key, prefix in partial.items():
            builders[key] = IndexedDatasetBuilder(data_file_path(prefix), dtype)
        return builders
    except OSError as error:
        for key, builder in builders.items():
            builder.close()
            data_file_path(partial[key]).unlink(missing_ok=True)
        problem = "is not a directory" if os.path.exists(directory) and not os.path.isdir(directory) \
            else f"cannot be written ({error.strerror})"
        raise DataError(f"--output-prefix: {directory} {problem}; pass a prefix in a writable directory") from None


def _require_documents(path: str, builders: dict[str, IndexedDatasetBuilder], stats: Stats) -> None:
    """Raise DataError (before anything is written) if a key got no document with text."""
    for key, builder in builders.items():
        if builder.num_documents == 0:
            raise DataError(f"--input {path} holds no documents with text under --json-keys {key!r} "
                            f"({stats.documents} records, {stats.empty.get(key, 0)} empty texts, "
                            f"{stats.bad_lines} bad lines skipped); nothing was written")


def preprocess(path: str, output_prefix: str, factory: Callable[[], AbstractTokenizer],
               keys: list[str], append_eod: bool, workers: int, skip_bad_lines: bool = False,
               progress: bool = True) -> Stats:
    """Write ``{output_prefix}_{key}_document.bin/.idx`` for each key; returns the counts.

    Writes nothing (and raises ConfigError) for a missing input, one without a document of text
    under some key, a malformed line (unless ``skip_bad_lines``), or an unwritable output directory.
    """
    start = time.perf_counter()  # the time includes building the tokenizer and the pool
    _check_inputs(path, workers)
    keys = list(dict.fromkeys(keys))  # a key named twice is one output, as before
    tokenizer = factory()
    dtype = best_token_dtype(tokenizer.vocab_size)
    final = {key: f"{output_prefix}_{key}_document" for key in keys}
    partial = {key: f"{prefix}.partial{os.getpid()}" for key, prefix in final.items()}
    builders = _open_builders(partial, dtype)
    stats = Stats(empty=dict.fromkeys(keys, 0))
    try:
        with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, disable=not progress,
                  desc="tokenising", file=sys.stderr) as bar:
            first_line = 1
            with contextlib.closing(_results(path, keys, append_eod, workers, dtype, tokenizer)) as results:
                for result in results:  # closing: an error here stops the workers at once
                    _write(result, builders, stats, skip_bad_lines, path, first_line)
                    first_line += result.lines
                    bar.update(sum(result.sizes))
                    stats.timeline.append((time.perf_counter() - start, stats.bytes))
        _require_documents(path, builders, stats)
        for key, builder in builders.items():
            builder.finalize(index_file_path(partial[key]))
            os.replace(data_file_path(partial[key]), data_file_path(final[key]))
            os.replace(index_file_path(partial[key]), index_file_path(final[key]))
    except WorkerDied as error:
        raise WorkerDied(f"{error}; nothing was written") from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        directory = os.path.dirname(os.path.abspath(output_prefix))
        raise TrainingAborted(f"--output-prefix: {directory} is full ({error.strerror}); nothing was written: "
                              "free space or pass a prefix on another disk") from None
    finally:
        for key, builder in builders.items():
            with contextlib.suppress(OSError):  # a full disk fails the flush again: the file goes anyway
                builder.close()
            for leftover in (data_file_path(partial[key]), index_file_path(partial[key])):
                if leftover.exists():
                    leftover.unlink()
    stats.seconds = time.perf_counter() - start
    return stats


def _write(result: EncodedBlock, builders: dict[str, IndexedDatasetBuilder], stats: Stats,
           skip_bad_lines: bool, path: str, first_line: int) -> None:
    if result.errors and not skip_bad_lines:
        number, message = result.errors[min(result.errors)]  # ``path:number`` in the block
        message = message.replace(f"{path}:{number}:", f"{path}:{first_line + number - 1}:", 1)
        raise LooseJSONError(message)  # nothing of this run will be kept
    stats.bytes += sum(result.sizes)
    stats.bad_lines += len(result.errors)
    stats.documents += len(result.sizes) - len(result.errors)
    for key, builder in builders.items():
        lengths = result.lengths[key]
        stats.empty[key] += int((lengths == 0).sum())
        builder.add_documents(result.ids[key], lengths[lengths > 0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="loose-JSON file")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--vocab-file", required=True)
    parser.add_argument("--merge-file", default=None, help="GPT-2's merges.txt (GPT2BPETokenizer only)")
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with <|endoftext|> (needed for GPT-2 training)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-bad-lines", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Preprocess as the flags say and print the throughput line."""
    source = argparse.Namespace(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                                merge_file=args.merge_file)
    factory = functools.partial(build_tokenizer, source)
    stats = preprocess(args.input, args.output_prefix, factory, args.json_keys,
                       args.append_eod, args.workers, args.skip_bad_lines, not args.no_progress)
    print(stats.throughput_line())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 done; 2 with one ``error:`` line (nothing written) for user mistakes."""
    return run_entry_point(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
