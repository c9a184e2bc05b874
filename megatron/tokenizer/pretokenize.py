"""GPT-2's pre-tokenisation regex, compiled for the Rust ``tokenizers`` pipeline.

GPT-2 splits text with ``regex`` (Python) using ``\\p{L}``, ``\\p{N}`` and ``\\s``. The Oniguruma
engine inside ``tokenizers`` ships older Unicode tables, so for a few thousand recently assigned
code points its ``\\p{L}`` disagrees with Python's and the ids would differ from GPT-2's. We
therefore spell the three classes out as explicit code-point ranges taken from the installed
``regex`` module: the split is then exactly the reference's, and still runs in Rust.
"""

from __future__ import annotations

from functools import lru_cache

import regex

_SURROGATES = range(0xD800, 0xE000)


def _all_code_points() -> str:
    """Every code point except surrogates, in order (index i maps back via ``_code_point``)."""
    return "".join(chr(cp) for cp in range(0x110000) if cp not in _SURROGATES)


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
