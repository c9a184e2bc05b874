"""GPT-2's pre-tokenisation regex, for the Rust regex engines of ``tiktoken`` and ``tokenizers``.

GPT-2 splits text with ``regex`` (Python) using ``\\p{L}``, ``\\p{N}`` and ``\\s``. The engines
inside ``tiktoken`` (fancy-regex) and ``tokenizers`` (Oniguruma) ship their own Unicode tables; where
these are older, for a few thousand recently assigned code points their ``\\p{L}`` disagrees with
Python's and the ids would differ from GPT-2's. We therefore spell the three classes out as explicit
code-point ranges (``\\x{41}-\\x{5a}``, a syntax both engines read) taken from the installed
``regex`` module: the split is then exactly the reference's, and still runs in Rust.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import regex

_SURROGATES = range(0xD800, 0xE000)


def _all_code_points() -> str:
    """Every code point except surrogates, in order (index i maps back via ``_code_point``)."""
    # Decoding UTF-32 builds the 1.1M characters in C: 10x faster than joining chr()s, and a
    # tokenizer built in a fresh process (a DataLoader worker) computes the pattern again.
    code_points = np.concatenate([np.arange(_SURROGATES.start, dtype="<u4"),
                                  np.arange(_SURROGATES.stop, 0x110000, dtype="<u4")])
    return code_points.tobytes().decode("utf-32-le")


def _code_point(index: int) -> int:
    """Code point at ``index`` of the string made by ``_all_code_points``."""
    return index if index < _SURROGATES.start else index + len(_SURROGATES)


def _ranges(property_pattern: str, universe: str) -> str:
    r"""Oniguruma class body (``\x{41}-\x{5a}...``) of the code points matching ``property_pattern``."""
    parts = []
    for match in regex.finditer(property_pattern + "+", universe):
        first, last = _code_point(match.start()), _code_point(match.end() - 1)
        parts.append(f"\\x{{{first:x}}}" if first == last else f"\\x{{{first:x}}}-\\x{{{last:x}}}")
    return "".join(parts)


@lru_cache(maxsize=1)
def gpt2_split_pattern() -> str:
    """GPT-2's pattern with ``\\p{L}``, ``\\p{N}``, ``\\s`` expanded per the installed ``regex``."""
    universe = _all_code_points()
    letters = _ranges(r"\p{L}", universe)
    numbers = _ranges(r"\p{N}", universe)
    spaces = _ranges(r"\s", universe)
    return (
        "'s|'t|'re|'ve|'m|'ll|'d"
        f"| ?[{letters}]+| ?[{numbers}]+| ?[^{spaces}{letters}{numbers}]+"
        f"|[{spaces}]+(?![^{spaces}])|[{spaces}]+"
    )
