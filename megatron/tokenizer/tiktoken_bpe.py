"""GPT-2's byte-level BPE encoded by ``tiktoken`` (Rust), built from ``vocab.json`` + ``merges.txt``.

GPT-2 merges symbol *pairs*: the adjacent pair listed first in ``merges.txt`` merges next.
tiktoken merges by the rank of the merged *byte string*, with the rank of merge ``i``'s result
following merge order. The two agree on every input when the merges satisfy (``tiktoken_ranks``
checks, else the caller falls back to Hugging Face ``tokenizers``):

1. each merge's parts are byte symbols or results of earlier merges;
2. no two merges make the same token (tiktoken keys ranks by bytes, so it could not tell them apart);
3. each merge's parts meet: pair BPE on the bytes of ``a + b`` makes ``a`` and ``b`` without first
   merging across their boundary. By induction every token's own bytes then encode to that token.

Why that suffices: GPT-2 applies merges in rank order (1. makes every new pair rank after the
merge that made it), and tiktoken applying them one at a time, leftmost first, is the same as
GPT-2's left-to-right pass for one pair. They can differ only where tiktoken merges adjacent tokens
``p, q`` whose bytes spell a token ``t`` made from another pair. ``p`` and ``q`` are adjacent in
some text only if they are when alone (context can only break a token, never keep two apart); by
3. the bytes of ``t`` encode to ``t``, so some merge crosses the ``p|q`` boundary before ``p`` or
``q`` is complete, and the two are never adjacent. Trained vocabularies (GPT-2's, the demo's)
satisfy all three; ``tests/unit/tokenizer`` checks the equality on random merge lists.

Tokens that are neither byte symbols nor merge results (``<|endoftext|>``) never come out of BPE:
they stay out of tiktoken's ranks, and decode by their own bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import regex
import tiktoken

# fancy-regex (tiktoken's engine) backtracks through a whitespace run for GPT-2's ``\s+(?!\S)``
# and stops with a stack overflow (a Rust panic) past about a million characters. Runs this long
# are cut out of the text and encoded as the pieces GPT-2 makes of them (``_encode_long_runs``).
LONG_WHITESPACE = 1 << 16
# A special token no call allows: tiktoken's numpy output goes through ``encode``, which with no
# special token at all would search an empty pattern at every position (a third slower).
_NEVER_ALLOWED = "<|special tokens are ordinary text|>"

@lru_cache(maxsize=1)
def byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level symbol (a printable character) -> the byte value it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in symbols.values()]
    symbols.update({chr(256 + index): byte for index, byte in enumerate(others)})
    return symbols


@lru_cache(maxsize=1)
def _symbols_to_latin1() -> dict[int, str]:
    """``str.translate`` table from each byte symbol to the Latin-1 character of its byte."""
    return {ord(symbol): chr(byte) for symbol, byte in byte_symbols().items()}


def token_bytes(token: str) -> bytes:
    """The bytes a token stands for; a token with characters that are not byte symbols (an
    added token) stands for its own UTF-8, as in Hugging Face's ``ByteLevel`` decoder."""
    if all(char in byte_symbols() for char in token):
        return token.translate(_symbols_to_latin1()).encode("latin-1")
    return token.encode("utf-8")


@dataclass
class _MergeTree:
    """Merges by number: byte symbols are 0-255 (in byte order), merge ``i``'s result is 256 + i.
    ``parts[i]`` are the numbers merge ``i`` joins; ``made_by[(a, b)]`` the number pair ``a, b``
    makes; ``tokens[n]`` the token string of number ``n``."""

    tokens: list[str]
    parts: list[tuple[int, int]]
    made_by: dict[tuple[int, int], int]


def _merge_tree(merges: Sequence[tuple[str, str]]) -> _MergeTree | str:
    """The merges numbered, or why they break conditions 1 or 2."""
    tokens = sorted(byte_symbols(), key=byte_symbols().get)
    number = {token: index for index, token in enumerate(tokens)}
    parts: list[tuple[int, int]] = []
    for index, (first, second) in enumerate(merges):
        pair = number.get(first), number.get(second)
        if None in pair:
            return f"merge {index} ({first!r} + {second!r}) uses a token no earlier merge makes"
        if first + second in number:
            return f"merge {index} ({first!r} + {second!r}) makes a token an earlier merge made"
        number[first + second] = len(tokens)
        tokens.append(first + second)
        parts.append(pair)
    return _MergeTree(tokens, parts, {pair: 256 + index for index, pair in enumerate(parts)})


def _parts_meet(first: int, second: int, tree: _MergeTree) -> bool:
    """Whether pair BPE on the bytes of tokens ``first + second`` (numbers) completes both before
    merging across their boundary (condition 3). Walks back in time from the moment both exist:
    the later-made one splits into its parts, and the pair then at the boundary must not merge
    before that split token was made (at equal rank the left of two overlapping pairs goes first)."""
    while True:
        if first > second and first >= 256:
            limit, first = first, tree.parts[first - 256][1]
        elif second >= 256:
            limit, second = second + 1, tree.parts[second - 256][0]
        else:
            return True  # back to two byte symbols
        crossing = tree.made_by.get((first, second))
        if crossing is not None and crossing < limit:
            return False


@dataclass(frozen=True)
class TiktokenRanks:
    """tiktoken's ``mergeable_ranks`` for a vocabulary, and how to turn ranks into its ids."""

    mergeable_ranks: dict[bytes, int]
    rank_to_id: list[int] | None  # None when every rank is its token's id


def tiktoken_ranks(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> TiktokenRanks | str:
    """Ranks for ``vocab``/``merges`` (already checked to belong together), or why tiktoken would
    not give GPT-2's ids. Merge results rank in merge order; when their ids already increase in
    merge order (GPT-2's and trained vocabularies) the ids are the ranks, else ranks are 0-255 for
    the bytes and ``256 + i`` for merge ``i``, and ``rank_to_id`` translates."""
    tree = _merge_tree(merges)
    if isinstance(tree, str):
        return tree
    for index, (first, second) in enumerate(tree.parts):
        if not _parts_meet(first, second, tree):
            return (f"merge {index} ({merges[index][0]!r} + {merges[index][1]!r}) is unreachable: "
                    "BPE merges across its parts' boundary first")
    ids = [vocab[token] for token in tree.tokens]
    table = _symbols_to_latin1()
    as_bytes = [token.translate(table).encode("latin-1") for token in tree.tokens]
    if all(earlier < later for earlier, later in zip(ids[256:], ids[257:])):
        return TiktokenRanks(dict(zip(as_bytes, ids)), None)
    return TiktokenRanks({token: rank for rank, token in enumerate(as_bytes)}, ids)


class TiktokenBPE:
    """Encoding with a ``tiktoken.Encoding`` (special tokens are ordinary text) and decoding by
    each id's bytes, invalid UTF-8 replaced by U+FFFD as Hugging Face's ``ByteLevel`` decoder does."""

    def __init__(self, vocab: dict[str, int], ranks: TiktokenRanks, pattern: str) -> None:
        unused_rank = max(ranks.mergeable_ranks.values()) + 1
        self._encoding = tiktoken.Encoding("gpt2-bpe", pat_str=pattern, mergeable_ranks=ranks.mergeable_ranks,
                                           special_tokens={_NEVER_ALLOWED: unused_rank})
        self._ranks = ranks
        self._rank_to_id_array = None if ranks.rank_to_id is None else np.asarray(ranks.rank_to_id, np.uint32)
        self._one_piece: tiktoken.Encoding | None = None  # built for the first long whitespace run
        self._id_to_bytes = {rank if ranks.rank_to_id is None else ranks.rank_to_id[rank]: as_bytes
                             for as_bytes, rank in ranks.mergeable_ranks.items()}
        for token, token_id in vocab.items():  # tokens BPE never makes: <|endoftext|>, added ones
            if token_id not in self._id_to_bytes:
                self._id_to_bytes[token_id] = token_bytes(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; ValueError for a lone surrogate (not Unicode text; tiktoken would
        silently encode U+FFFD instead)."""
        if not text.isascii():
            _check_encodable(text)
        if len(text) >= LONG_WHITESPACE and _may_hold_long_run(text):
            ranks = self._encode_long_runs(text)
        else:
            ranks = self._encoding.encode_ordinary(text)
        rank_to_id = self._ranks.rank_to_id
        return ranks if rank_to_id is None else [rank_to_id[rank] for rank in ranks]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One text after another: tiktoken's encode_ordinary_batch (a thread pool) costs more CPU
        # per byte, and preprocessing already runs one process per core.
        encode = self.encode
        return [encode(text) for text in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a uint32 array, without a Python int per token: about 1.3x the rate
        of ``encode`` and a conversion. Special tokens are ordinary text here too (none allowed)."""
        if not text.isascii():
            _check_encodable(text)
        if len(text) >= LONG_WHITESPACE and _may_hold_long_run(text):
            ranks = np.asarray(self._encode_long_runs(text), np.uint32)
        else:
            ranks = self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return ranks if self._rank_to_id_array is None else self._rank_to_id_array[ranks]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ids outside the vocabulary (a model's padding) decode to nothing."""
        table = self._id_to_bytes
        return b"".join(table.get(int(token_id), b"") for token_id in ids).decode("utf-8", errors="replace")

    def _encode_long_runs(self, text: str) -> list[int]:
        """Ranks of ``text`` with each whitespace run of LONG_WHITESPACE or more characters cut
        out. GPT-2 makes such a run one piece, less its last character when text follows (that
        character starts the next piece), and no pattern joins a run to the text before it; the
        regex starts afresh after each piece, so the text around the runs splits as before."""
        if self._one_piece is None:
            self._one_piece = tiktoken.Encoding("gpt2-bpe-piece", pat_str=r"[\s\S]+",
                                                mergeable_ranks=self._ranks.mergeable_ranks, special_tokens={})
        ranks: list[int] = []
        position = 0
        for run in _long_run(LONG_WHITESPACE).finditer(text):
            piece_end = run.end() if run.end() == len(text) else run.end() - 1
            ranks += self._encoding.encode_ordinary(text[position:run.start()])
            ranks += self._one_piece.encode_ordinary(text[run.start():piece_end])
            position = piece_end
        return ranks + self._encoding.encode_ordinary(text[position:])


@lru_cache(maxsize=2)
def _long_run(length: int) -> regex.Pattern:
    return regex.compile(rf"\s{{{length},}}")  # GPT-2's \s, as in its pattern


def _may_hold_long_run(text: str) -> bool:
    """False only if ``text`` has no whitespace run of LONG_WHITESPACE characters: such a run
    covers two neighbouring characters of every (LONG_WHITESPACE // 2)-th one."""
    return regex.search(r"\s\s", text[::LONG_WHITESPACE // 2]) is not None


def _check_encodable(text: str) -> None:
    """Raise ValueError naming the first lone surrogate of ``text``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"text holds a lone surrogate U+{ord(text[error.start]):04X} at index "
                         f"{error.start} (an unpaired \\u escape?): it is not Unicode text and has "
                         "no GPT-2 tokens") from None
