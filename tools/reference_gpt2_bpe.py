"""Pure-Python GPT-2 byte-level BPE: the published algorithm, kept as an independent reference.

This follows OpenAI's ``gpt-2/src/encoder.py`` (and the original Megatron ``GPT2Tokenizer``):
the byte-to-unicode table, GPT-2's pre-tokenisation regex (Python ``regex`` module) and merges
applied lowest rank first. It shares no code with ``megatron.tokenizer``, so the tests can check
the Rust-backed tokenizer against it, and ``tools/bench_preprocess.py`` times it as the baseline.
"""

from __future__ import annotations

import json
from functools import lru_cache

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, code_points = printable[:], printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, map(chr, code_points)))


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """Adjacent symbol pairs of ``word``."""
    return set(zip(word[:-1], word[1:]))


class ReferenceGPT2BPE:
    """GPT-2's encoder: ``encode(text) -> list[int]`` and ``decode(ids) -> str``."""

    def __init__(self, vocab_file: str, merges_file: str) -> None:
        with open(vocab_file, encoding="utf-8") as handle:
            self.encoder: dict[str, int] = json.load(handle)
        self.decoder = {token_id: token for token, token_id in self.encoder.items()}
        with open(merges_file, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache: dict[str, str] = {}

    def bpe(self, token: str) -> str:
        """Merge the symbols of one pre-token by rank; returns space-joined final symbols."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = get_pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (``<|endoftext|>`` in text is ordinary text, as in GPT-2)."""
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte runs become U+FFFD."""
        text = "".join(self.decoder[token_id] for token_id in ids)
        return bytearray(self.byte_decoder[char] for char in text).decode("utf-8", errors="replace")
