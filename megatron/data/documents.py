"""Document stores: anything with ``sizes`` (tokens per document) and ``get(i, offset, length)``.

``MMapIndexedDataset`` is one; ``InMemoryDocuments`` holds a tokenised loose-JSON corpus and
``ConcatDocuments`` joins several stores (several ``--train-data`` files) into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Documents(Protocol):
    """Read access to tokenised documents."""

    sizes: np.ndarray

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``index``."""


class InMemoryDocuments:
    """Documents stored back to back in one token array."""

    def __init__(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        self.tokens = tokens
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        assert self.starts[-1] == tokens.size, "sizes must add up to the token count"

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = self.starts[index] + offset
        stop = start + (self.sizes[index] - offset if length is None else length)
        return self.tokens[start:stop]

    def max_token(self) -> int:
        return int(self.tokens.max()) if self.tokens.size else -1


class ConcatDocuments:
    """The documents of several stores, in order."""

    def __init__(self, parts: Sequence[Documents]) -> None:
        self.parts = list(parts)
        self.sizes = np.concatenate([np.asarray(part.sizes, dtype=np.int64) for part in self.parts])
        self.firsts = np.cumsum([0] + [len(part.sizes) for part in self.parts])

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        part = int(np.searchsorted(self.firsts, index, side="right")) - 1
        return self.parts[part].get(index - int(self.firsts[part]), offset, length)

    def max_token(self) -> int:
        return max((part.max_token() for part in self.parts), default=-1)
