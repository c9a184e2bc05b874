"""GPT2BPETokenizer's tiktoken backend: GPT-2's ids for every merge list it accepts, a fallback
for those it cannot reproduce, GPT-2's split on every class boundary, every byte, Hugging Face's
decoding."""

from __future__ import annotations

import itertools
import json
import pickle
import random
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken

from megatron.tokenizer import EOD_TOKEN, GPT2BPETokenizer, tiktoken_bpe
from megatron.tokenizer.pretokenize import _all_code_points, gpt2_split_pattern
from megatron.tokenizer.tiktoken_bpe import byte_symbols

pytest_plugins = ["data_helpers"]  # demo_paths, demo_tokenizer, reference_bpe fixtures

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def write_bpe(directory: Path, merges: list[tuple[str, str]], ids: dict[str, int] | None = None) -> tuple[str, str]:
    """GPT-2 files for ``merges`` over the 256 byte symbols (ids in order, or ``ids``)."""
    tokens = [*sorted(byte_symbols(), key=byte_symbols().get), *(a + b for a, b in merges), EOD_TOKEN]
    vocab = ids or {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return str(directory / "vocab.json"), str(directory / "merges.txt")


def random_merges(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` merges of random pairs of the tokens so far over ``abc``, in random order: each
    makes a new token (distinct results), but many make a token whose own bytes BPE splits."""
    tokens, merges = ["a", "b", "c"], []
    while len(merges) < count:
        first, second = rng.choice(tokens), rng.choice(tokens)
        if first + second not in tokens:
            merges.append((first, second))
            tokens.append(first + second)
    return merges


def unchecked_tiktoken(merges: list[tuple[str, str]]) -> tiktoken.Encoding:
    """tiktoken with ranks in merge order and no precondition check (ids = write_bpe's ids)."""
    ranks = {bytes([byte]): byte for byte in range(256)}
    ranks.update({(a + b).encode(): 256 + index for index, (a, b) in enumerate(merges)})
    return tiktoken.Encoding("unchecked", pat_str=gpt2_split_pattern(), mergeable_ranks=ranks,
                             special_tokens={})


def test_random_merge_lists_give_gpt2_ids_or_fall_back(tmp_path, reference_bpe):
    """Rank-by-merged-bytes equals GPT-2's pair BPE exactly when the construction check passes:
    every accepted merge list gives the reference's ids on all strings over ``abc`` up to length 6
    (and 10 of 100-300, which tiktoken merges with a heap) and on every token's own bytes; every refused one makes unchecked tiktoken differ somewhere
    (distinct merge results alone would not be enough)."""
    rng = random.Random(19)
    texts = ["".join(chars) for length in range(1, 7) for chars in itertools.product("abc", repeat=length)]
    texts += ["".join(rng.choices("abc", k=rng.randint(100, 300))) for _ in range(10)]  # tiktoken's heap path
    backends = []
    for _ in range(80):
        merges = random_merges(rng, rng.randint(3, 10))
        vocab, merge_file = write_bpe(tmp_path, merges)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = GPT2BPETokenizer(vocab, merge_file)
        reference = reference_bpe(vocab, merge_file)
        inputs = texts + [a + b for a, b in merges]
        expected = [reference.encode(text) for text in inputs]
        assert tokenizer.tokenize_batch(inputs) == expected, (merges, tokenizer.backend)
        assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(inputs, np.int32)] == expected
        backends.append(tokenizer.backend)
        if tokenizer.backend == "tokenizers":
            assert "unreachable" in str(caught[0].message)
            unchecked = unchecked_tiktoken(merges)
            assert any(unchecked.encode_ordinary(text) != ids for text, ids in zip(inputs, expected)), merges
    assert 20 < backends.count("tiktoken") < 70  # both outcomes well exercised


def test_unordered_or_duplicate_merges_fall_back(tmp_path, reference_bpe):
    cases = {"uses a token no earlier merge makes": [("a", "bc"), ("b", "c")],
             "makes a token an earlier merge made": [("a", "b"), ("ab", "c"), ("b", "c"), ("a", "bc")]}
    for reason, merges in cases.items():
        vocab, merge_file = write_bpe(tmp_path, merges)
        if len({a + b for a, b in merges}) < len(merges):  # one token, two merges: write the vocab by hand
            tokens = [*sorted(byte_symbols(), key=byte_symbols().get), *dict.fromkeys(a + b for a, b in merges), EOD_TOKEN]
            vocab, merge_file = write_bpe(tmp_path, merges, {token: index for index, token in enumerate(tokens)})
        with pytest.warns(UserWarning, match=reason):
            tokenizer = GPT2BPETokenizer(vocab, merge_file)
        assert tokenizer.backend == "tokenizers"
        reference = reference_bpe(vocab, merge_file)
        for text in ("abc", "abcabc", "bcab", "aabbcc"):
            assert tokenizer.tokenize(text) == reference.encode(text)


def test_ids_not_in_merge_order_are_translated(tmp_path, demo_paths, reference_bpe):
    """Ranks must follow merge order; ids need not: shuffled ids go through the rank->id map."""
    vocab = json.loads(Path(demo_paths["vocab"]).read_text(encoding="utf-8"))
    tokens = list(vocab)
    shuffled = list(vocab.values())
    random.Random(3).shuffle(shuffled)
    (tmp_path / "v.json").write_text(json.dumps(dict(zip(tokens, shuffled))), encoding="utf-8")
    tokenizer = GPT2BPETokenizer(str(tmp_path / "v.json"), str(demo_paths["merges"]))
    assert tokenizer.backend == "tiktoken" and tokenizer._encoder._ranks.rank_to_id is not None
    reference = reference_bpe(str(tmp_path / "v.json"), str(demo_paths["merges"]))
    texts = [json.loads(line)["text"] for line in open(demo_paths["data"], encoding="utf-8")][:300]
    texts.append("".join(map(chr, range(256))) + " ünïcödé 中文 😀 <|endoftext|>")
    expected = [reference.encode(text) for text in texts]
    assert tokenizer.tokenize_batch(texts) == expected
    assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(texts, np.int32)] == expected
    assert [tokenizer.detokenize(ids) for ids in expected] == texts


def split_check_texts() -> list[str]:
    """Texts whose GPT-2 split shows how each code point at an edge of the expanded classes
    (and the first of each Unicode category) is classified, and every run of each whitespace
    character before a letter, digit, symbol, newline, space or the end."""
    points = set()
    for low, high in re.findall(r"\\x\{([0-9a-f]+)\}(?:-\\x\{([0-9a-f]+)\})?", gpt2_split_pattern()):
        low, high = int(low, 16), int(high or low, 16)
        points.update((low - 1, low, high, high + 1))
    universe = _all_code_points()
    first_of_category: dict[str, str] = {}
    for char in universe:
        first_of_category.setdefault(unicodedata.category(char), char)
    chars = sorted({chr(p) for p in points if 0 <= p < 0x110000 and not 0xD800 <= p < 0xE000}
                   | set(first_of_category.values()))
    texts = ["".join(f"a{c}1{c}.{c}  {c}x{c}{c}'s{c}\n" for c in chars[start:start + 200])
             for start in range(0, len(chars), 200)]
    for space in regex.findall(r"\s", universe):
        texts.append("".join(f"a{space * n}{end}" for n in (1, 2, 3) for end in ("b", "1", ".", "\n", " ", "\t"))
                     + space * 2)
    return texts


def test_tiktoken_splits_like_python_regex():
    """The expanded pattern splits in tiktoken's engine as GPT-2's does in Python ``regex``. The
    vocabulary holds every substring of each expected piece and of each two neighbouring pieces,
    so each piece encodes to one token and any other split shows (a token across a boundary or
    a part of a piece); the stock ``\\p{L}`` pattern fails this check."""
    texts = split_check_texts()
    pieces = [[piece.encode() for piece in regex.findall(GPT2_PATTERN, text)] for text in texts]
    tokens = {bytes([byte]) for byte in range(256)}
    for text_pieces in pieces:
        for piece, following in zip(text_pieces, [*text_pieces[1:], b""]):
            pair = piece + following
            tokens.update(pair[i:j] for i in range(len(piece)) for j in range(i + 1, len(pair) + 1))
    ranks = {token: rank for rank, token in enumerate(sorted(tokens))}

    def split(pattern: str) -> list[list[bytes]]:
        encoding = tiktoken.Encoding("split", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        return [[encoding.decode_single_token_bytes(token) for token in encoding.encode_ordinary(text)]
                for text in texts]

    assert split(gpt2_split_pattern()) == pieces
    assert split(GPT2_PATTERN) != pieces  # tiktoken's own Unicode tables are not Python's


def every_utf8_byte() -> str:
    """All 256 code points below 256, and a character for each UTF-8 lead byte C2-F4 with each
    continuation byte 80-BF: every byte a UTF-8 text can hold."""
    chars = [chr(cp) for cp in range(256)]
    chars += [chr(max((lead - 0xC0) << 6, 0x80)) for lead in range(0xC2, 0xE0)]
    chars += [chr(max((lead - 0xE0) << 12, 0x800)) for lead in range(0xE0, 0xF0)]
    chars += [chr(max((lead - 0xF0) << 18, 0x10000)) for lead in range(0xF0, 0xF5)]
    chars += [chr(0x100 + i) + chr(0x4E00 + i) + chr(0x1F600 + i) for i in range(64)]  # continuations
    text = "".join(chars)
    assert set(text.encode()) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    return text


def test_every_byte_category_and_special_text(demo_paths, reference_bpe):
    text = every_utf8_byte()
    texts = [text, text[::-1], " ".join(text), "a <|endoftext|> b<|endoftext|>", EOD_TOKEN,
             "".join(c * 3 + " " for c in split_check_texts()[0])]
    tokenizer = GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    hf = GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]), backend="tokenizers")
    reference = reference_bpe(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    assert tokenizer.backend == "tiktoken" and hf.backend == "tokenizers"
    expected = [reference.encode(t) for t in texts]
    assert tokenizer.tokenize_batch(texts) == expected == hf.tokenize_batch(texts)
    assert [tokenizer.tokenize(t) for t in texts] == expected
    assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(texts, np.uint16)] == expected
    assert tokenizer.eod not in expected[3] + expected[4]
    assert [tokenizer.detokenize(ids) for ids in expected] == texts


def test_decoding_matches_hugging_face(tmp_path, demo_paths):
    """Invalid UTF-8 (single byte tokens in any order, cut multi-byte characters), <|endoftext|>,
    an added token that is not byte symbols, ids past the vocabulary: as Hugging Face decodes."""
    vocab = json.loads(Path(demo_paths["vocab"]).read_text(encoding="utf-8"))
    vocab["€ added"] = len(vocab)
    (tmp_path / "v.json").write_text(json.dumps(vocab), encoding="utf-8")
    files = str(tmp_path / "v.json"), str(demo_paths["merges"])
    tokenizer, hf = GPT2BPETokenizer(*files), GPT2BPETokenizer(*files, backend="tokenizers")
    assert tokenizer.backend == "tiktoken"
    rng = random.Random(5)
    byte_ids = [vocab[symbol] for symbol in byte_symbols()]
    sequences = [[i] for i in byte_ids] + [rng.choices(byte_ids, k=rng.randint(1, 12)) for _ in range(3000)]
    sequences += [rng.choices(range(len(vocab) + 3), k=rng.randint(1, 30)) for _ in range(1000)]
    sequences += [tokenizer.tokenize("中文 😀 ü")[:cut] for cut in range(1, 8)]
    sequences += [[vocab[EOD_TOKEN], vocab["€ added"], len(vocab) + 100]]
    assert [tokenizer.detokenize(ids) for ids in sequences] == [hf.detokenize(ids) for ids in sequences]


def test_lone_surrogate_is_a_clear_error(demo_tokenizer):
    assert demo_tokenizer.backend == "tiktoken"
    with pytest.raises(ValueError, match="lone surrogate U\\+D800 at index 4"):
        demo_tokenizer.tokenize("bad \ud800 text")
    with pytest.raises(ValueError, match="lone surrogate U\\+DCFF"):
        demo_tokenizer.tokenize_batch(["fine", "\udcff"])
    assert demo_tokenizer.tokenize("\U0001F600") == demo_tokenizer.tokenize("\ud83d\ude00".encode(
        "utf-16", "surrogatepass").decode("utf-16"))


def test_pickle_keeps_the_backend(demo_paths):
    for backend in ("auto", "tokenizers"):
        tokenizer = GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]), backend=backend)
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert clone.backend == tokenizer.backend
        assert clone.tokenize("pickled ünï") == tokenizer.tokenize("pickled ünï")
    with pytest.raises(ValueError, match="backend 'fast' is not one of auto, tokenizers"):
        GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]), backend="fast")


def test_long_pieces_match_reference(demo_tokenizer, demo_paths, reference_bpe):
    """Pieces of 100 bytes or more go through tiktoken's heap-based merge."""
    rng = random.Random(7)
    alphabets = ("etaoinshrdlu", "0123456789", "!?.,;:-()", "的一是不了人我在有他")
    texts = ["".join(rng.choices(rng.choice(alphabets), k=rng.randint(100, 400))) for _ in range(16)]
    reference = reference_bpe(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    assert demo_tokenizer.tokenize_batch(texts) == [reference.encode(text) for text in texts]


def test_long_whitespace_runs_split_as_gpt2(monkeypatch, demo_paths, reference_bpe):
    """Whitespace runs from LONG_WHITESPACE characters on are cut out of the text (fancy-regex
    overflows its stack on a million); with the threshold at 4, random whitespace-heavy texts
    keep the reference's ids."""
    monkeypatch.setattr(tiktoken_bpe, "LONG_WHITESPACE", 4)
    tokenizer = GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    reference = reference_bpe(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    rng = random.Random(11)
    pieces = [" ", " ", " ", "\n", "\t", "\r\n", "\u3000", "\u2028", "a", "word", "7", ".", "'s", "中"]
    texts = ["".join(rng.choices(pieces, k=rng.randint(1, 40))) for _ in range(3000)]
    long_runs = sum(tiktoken_bpe._long_run(4).search(text) is not None for text in texts)
    assert long_runs > 1000
    expected = [reference.encode(text) for text in texts]
    assert tokenizer.tokenize_batch(texts) == expected
    assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(texts, np.uint16)] == expected


def test_million_character_whitespace_runs(demo_paths):
    """Past fancy-regex's stack (about 1M characters of one whitespace run), the same ids as the
    Hugging Face backend, where tiktoken alone panics."""
    files = str(demo_paths["vocab"]), str(demo_paths["merges"])
    tokenizer, hf = GPT2BPETokenizer(*files), GPT2BPETokenizer(*files, backend="tokenizers")
    run = 1_050_000
    texts = ["x" + " " * run + "y", "a.\n" + "\t \u3000" * (run // 3)]
    expected = hf.tokenize_batch(texts)
    assert tokenizer.tokenize_batch(texts) == expected
    assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(texts, np.uint16)] == expected
