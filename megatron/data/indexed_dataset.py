"""Megatron's mmap indexed dataset: a ``.bin`` of token ids and an ``.idx`` describing it.

``.idx`` layout (little-endian), exactly as Megatron-LM writes it::

    b"MMIDIDX\\x00\\x00"        9-byte magic
    u64 version = 1
    u8  dtype code            1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 double, 8 uint16
    u64 sequence count N
    u64 document count D      (len of doc_idx: number of documents + 1)
    int32[N] sizes            tokens per sequence
    int64[N] pointers         byte offset of each sequence in .bin
    int64[D] doc_idx          sequence index where each document starts, then N

``.bin`` is the sequences' tokens back to back in that dtype. Here one sequence is one document.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megatron.data.errors import IndexedDatasetError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float64, 7: np.double, 8: np.uint16}
TOKEN_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16)


def dtype_code(dtype: np.dtype | type) -> int:
    """Megatron's code for ``dtype`` (the first one listed, for float64)."""
    for code, candidate in DTYPES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no Megatron code; use one of {list(DTYPES.values())}")


def best_token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits comfortably (vocab < 65500), else int32 (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


class IndexedDatasetBuilder:
    """Streams documents into ``bin_path``; ``finalize(idx_path)`` writes the index."""

    def __init__(self, bin_path: str | os.PathLike, dtype: type = np.uint16) -> None:
        dtype_code(dtype)
        self.dtype = np.dtype(dtype)
        self._bin = open(bin_path, "wb")  # noqa: SIM115 - closed in finalize
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document (a single sequence) of token ids."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._sizes.append(array.size)
        self._doc_idx.append(len(self._sizes))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose ids lie back to back in ``tokens``."""
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"the lengths add up to {int(lengths.sum())} tokens, not {tokens.size}")
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        first = len(self._sizes)
        self._sizes.extend(lengths.tolist())
        self._doc_idx.extend(range(first + 1, len(self._sizes) + 1))

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Close the ``.bin`` without writing an index (an abandoned build; idempotent)."""
        self._bin.close()

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self._bin.close()
        write_index(idx_path, self.dtype, np.asarray(self._sizes, dtype=np.int32),
                    np.asarray(self._doc_idx, dtype=np.int64))


def write_index(idx_path: str | os.PathLike, dtype: np.dtype, sizes: np.ndarray,
                doc_idx: np.ndarray) -> None:
    """Write an ``.idx`` for sequences of ``sizes`` tokens of ``dtype`` stored back to back."""
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(idx_path, "wb") as handle:
        handle.write(MAGIC)
        handle.write(struct.pack("<Q", VERSION))
        handle.write(struct.pack("<B", dtype_code(dtype)))
        handle.write(struct.pack("<Q", len(sizes)))
        handle.write(struct.pack("<Q", len(doc_idx)))
        handle.write(sizes.astype("<i4").tobytes(order="C"))
        handle.write(pointers.astype("<i8").tobytes(order="C"))
        handle.write(doc_idx.astype("<i8").tobytes(order="C"))


def check_prefix_files(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``(prefix.idx, prefix.bin)``; IndexedDatasetError naming the file unless both are files."""
    paths = index_file_path(prefix), data_file_path(prefix)
    for path in paths:
        if path.is_dir():
            raise IndexedDatasetError(f"{path} is a directory, not a file; --data-path takes the prefix of a "
                                      ".bin/.idx pair written by tools/preprocess_data.py")
        if not path.is_file():
            raise IndexedDatasetError(
                f"{path} does not exist; --data-path takes the prefix of a .bin/.idx pair "
                "written by tools/preprocess_data.py (e.g. my-corpus_text_document)")
    return paths


class MMapIndexedDataset:
    """Read-only view of ``prefix.bin``/``prefix.idx``; ``get(i)`` is document ``i``'s tokens.

    Validates magic, version, dtype and both file sizes on open; raises ``IndexedDatasetError``
    naming the file and the fix. Pickles as its prefix (cheap for DataLoader workers).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = check_prefix_files(self.prefix)
        self.dtype, self.sizes, self.pointers, self.doc_idx = _read_index(idx_path)
        self._bin = _map_bin(bin_path, self.dtype, self.sizes, self.pointers)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``index`` (a view into the mmap)."""
        start = self.pointers[index] // self.dtype.itemsize + offset
        stop = start + (self.sizes[index] - offset if length is None else length)
        return self._bin[start:stop]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def max_token(self, chunk: int = 1 << 26) -> int:
        """Largest token id in the ``.bin`` (-1 if empty); scans in chunks."""
        return max((int(self._bin[i:i + chunk].max()) for i in range(0, self._bin.size, chunk)),
                   default=-1)


def _read_index(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate ``idx_path``; returns (dtype, sizes, pointers, doc_idx)."""
    file_size = idx_path.stat().st_size
    with open(idx_path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
    if header[:len(MAGIC)] != MAGIC:
        raise IndexedDatasetError(f"{idx_path} is not a Megatron mmap index (magic "
                                  f"{header[:len(MAGIC)]!r}, expected {MAGIC!r}); regenerate it "
                                  "with tools/preprocess_data.py")
    if len(header) < HEADER_BYTES:
        raise IndexedDatasetError(f"{idx_path} is truncated ({file_size} bytes, header needs "
                                  f"{HEADER_BYTES}); regenerate it with tools/preprocess_data.py")
    version, code, num_seqs, num_docs = struct.unpack("<QBQQ", header[len(MAGIC):])
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path} has index version {version}; only version "
                                  f"{VERSION} is supported. Regenerate it with tools/preprocess_data.py")
    if code not in DTYPES or DTYPES[code] not in TOKEN_DTYPES:
        raise IndexedDatasetError(f"{idx_path} has dtype code {code}; token ids need an integer "
                                  "code (1-5 or 8). Regenerate it with tools/preprocess_data.py")
    expected = HEADER_BYTES + num_seqs * 12 + num_docs * 8
    if file_size != expected:
        raise IndexedDatasetError(f"{idx_path} is {file_size} bytes but its header ({num_seqs} "
                                  f"sequences, {num_docs} document entries) implies {expected}: "
                                  "truncated or corrupt; regenerate it with tools/preprocess_data.py")
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    sizes = np.frombuffer(index, dtype="<i4", count=num_seqs, offset=HEADER_BYTES)
    pointers = np.frombuffer(index, dtype="<i8", count=num_seqs, offset=HEADER_BYTES + num_seqs * 4)
    doc_idx = np.frombuffer(index, dtype="<i8", count=num_docs, offset=HEADER_BYTES + num_seqs * 12)
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    _check_index_arrays(idx_path, dtype, sizes, pointers, doc_idx)
    return dtype, sizes, pointers, doc_idx


def _check_index_arrays(idx_path: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray,
                        doc_idx: np.ndarray) -> None:
    """Raise unless sizes are non-negative, pointers contiguous and doc_idx monotone 0..N."""
    expected_pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=expected_pointers[1:])
    bad_docs = len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(sizes) \
        or bool(np.any(np.diff(doc_idx) < 0))
    if (sizes < 0).any() or not np.array_equal(pointers, expected_pointers) or bad_docs:
        raise IndexedDatasetError(f"{idx_path} has inconsistent sizes/pointers/doc_idx (corrupt "
                                  "or written by another tool); regenerate it with "
                                  "tools/preprocess_data.py")


def _map_bin(bin_path: Path, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray) -> np.ndarray:
    """Memory-map ``bin_path`` after checking its size matches the index."""
    expected = int(sizes.astype(np.int64).sum()) * dtype.itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise IndexedDatasetError(f"{bin_path} is {actual} bytes but its .idx describes {expected} "
                                  "bytes: truncated, or the .bin and .idx come from different runs; "
                                  "regenerate both with tools/preprocess_data.py")
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, mode="r", dtype=dtype)
