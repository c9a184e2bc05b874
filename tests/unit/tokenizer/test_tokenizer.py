"""GPT2BPETokenizer: ids identical to the pure-Python GPT-2 reference and to the Hugging Face
backend; clear errors for bad files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron.tokenizer import EOD_TOKEN, GPT2BPETokenizer, TokenizerFileError, build_tokenizer
from megatron.tokenizer.training import train_byte_level_bpe

pytest_plugins = ["data_helpers"]  # demo_paths, demo_tokenizer, reference_bpe fixtures


def random_unicode(rng: random.Random, max_chars: int = 40) -> str:
    """Mixed text: ASCII words, whitespace, contractions, Latin/Greek/CJK, any code point."""
    pieces = []
    for _ in range(rng.randint(0, max_chars)):
        roll = rng.random()
        if roll < 0.25:
            pieces.append(rng.choice([" ", "  ", "\t", "\n", "\r\n", "'s", "'ll", " the", "1", "."]))
        elif roll < 0.5:
            pieces.append(chr(rng.randint(0x20, 0x7E)))
        elif roll < 0.7:
            pieces.append(chr(rng.choice([rng.randint(0xA0, 0x52F), rng.randint(0x4E00, 0x4FFF),
                                          rng.randint(0x1F300, 0x1F6FF), rng.randint(0x2000, 0x206F)])))
        else:
            code_point = rng.randint(0, 0x10FFFF)
            while 0xD800 <= code_point < 0xE000:
                code_point = rng.randint(0, 0x10FFFF)
            pieces.append(chr(code_point))
    return "".join(pieces)


@pytest.fixture(scope="module")
def random_strings() -> list[str]:
    rng = random.Random(20261125)
    return [random_unicode(rng) for _ in range(10_000)]


@pytest.fixture(scope="module")
def unicode_tokenizer_files(tmp_path_factory, random_strings) -> tuple[str, str]:
    """A BPE trained on random Unicode, so merges span multi-byte characters."""
    out = tmp_path_factory.mktemp("unicode_bpe")
    vocab, merges = train_byte_level_bpe(random_strings * 3, 2000, out, prefix="uni")
    return str(vocab), str(merges)


def assert_same_ids(reference_bpe: type, vocab: str, merges: str, texts: list[str]) -> None:
    """tiktoken's ids equal the reference's and the Hugging Face backend's; both decode back."""
    tokenizer, reference = GPT2BPETokenizer(vocab, merges), reference_bpe(vocab, merges)
    hf = GPT2BPETokenizer(vocab, merges, backend="tokenizers")
    assert tokenizer.backend == "tiktoken"
    got = tokenizer.tokenize_batch(texts)
    assert got == hf.tokenize_batch(texts)
    assert [ids.tolist() for ids in tokenizer.tokenize_batch_numpy(texts, np.uint16)] == got
    for text, ids in zip(texts, got):
        assert ids == reference.encode(text), f"ids differ for {text!r}"
        assert tokenizer.detokenize(ids) == text == hf.detokenize(ids)


def test_random_unicode_matches_reference_demo_vocab(reference_bpe, demo_paths, random_strings):
    assert_same_ids(reference_bpe, str(demo_paths["vocab"]), str(demo_paths["merges"]), random_strings)


def test_random_unicode_matches_reference_unicode_vocab(reference_bpe, unicode_tokenizer_files,
                                                        random_strings):
    assert_same_ids(reference_bpe, *unicode_tokenizer_files, random_strings)


def test_demo_corpus_matches_reference(reference_bpe, demo_paths):
    with open(demo_paths["data"], encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    assert_same_ids(reference_bpe, str(demo_paths["vocab"]), str(demo_paths["merges"]), texts)


def test_eod_and_sizes(demo_tokenizer):
    assert demo_tokenizer.vocab_size == 8000
    assert demo_tokenizer.eod == 7999  # last, as in GPT-2's vocab
    assert demo_tokenizer.detokenize([demo_tokenizer.eod]) == EOD_TOKEN
    # As in GPT-2, <|endoftext|> inside text is ordinary text, not the eod id.
    assert demo_tokenizer.eod not in demo_tokenizer.tokenize("a <|endoftext|> b")
    assert demo_tokenizer.tokenize("") == []
    assert demo_tokenizer.name == "GPT2BPETokenizer"


def test_mismatched_vocab_and_merges(tmp_path, demo_paths, unicode_tokenizer_files):
    with pytest.raises(TokenizerFileError, match="do not belong together") as info:
        GPT2BPETokenizer(unicode_tokenizer_files[0], str(demo_paths["merges"]))
    assert "gpt2-merges.txt" in str(info.value)
    vocab = json.loads(Path(demo_paths["vocab"]).read_text(encoding="utf-8"))
    del vocab[EOD_TOKEN]
    (tmp_path / "v.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="no <\\|endoftext\\|>"):
        GPT2BPETokenizer(str(tmp_path / "v.json"), str(demo_paths["merges"]))


def test_missing_and_malformed_files(tmp_path, demo_paths):
    with pytest.raises(ValueError, match="nope.json does not exist"):
        GPT2BPETokenizer(str(tmp_path / "nope.json"), str(demo_paths["merges"]))
    with pytest.raises(ValueError, match="nope.txt does not exist"):
        GPT2BPETokenizer(str(demo_paths["vocab"]), str(tmp_path / "nope.txt"))
    shutil.copy(demo_paths["merges"], tmp_path / "bad.txt")
    with open(tmp_path / "bad.txt", "a", encoding="utf-8") as handle:
        handle.write("a b c\n")
    with pytest.raises(ValueError, match=r"bad.txt:\d+: expected two symbols"):
        GPT2BPETokenizer(str(demo_paths["vocab"]), str(tmp_path / "bad.txt"))
    (tmp_path / "notjson.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON vocab"):
        GPT2BPETokenizer(str(tmp_path / "notjson.json"), str(demo_paths["merges"]))


def test_build_tokenizer_from_args(reference_bpe, demo_paths):
    from data_helpers import data_args

    tokenizer = build_tokenizer(data_args(demo_paths))
    assert tokenizer.tokenize("hello world") == reference_bpe(
        str(demo_paths["vocab"]), str(demo_paths["merges"])).encode("hello world")
    with pytest.raises(ValueError, match="--vocab-file and --merge-file"):
        build_tokenizer(data_args(demo_paths, vocab_file=None))


def test_pickle_roundtrip(demo_tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(demo_tokenizer))
    assert clone.tokenize("pickled tokenizer") == demo_tokenizer.tokenize("pickled tokenizer")


def test_fingerprint_follows_the_vocabulary_not_its_formatting(tmp_path, demo_paths):
    """A checkpoint records this fingerprint; re-formatting vocab.json (indent, key order) or
    merges.txt line ends keeps it, one changed merge or token id does not."""
    from argparse import Namespace

    from megatron.tokenizer import tokenizer_fingerprint

    def fingerprint(vocab: Path, merges: Path) -> str:
        return tokenizer_fingerprint(Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab),
                                               merge_file=str(merges)))

    original = fingerprint(demo_paths["vocab"], demo_paths["merges"])
    vocab = json.loads(Path(demo_paths["vocab"]).read_text(encoding="utf-8"))
    merges = Path(demo_paths["merges"]).read_text(encoding="utf-8")
    (tmp_path / "v.json").write_text(json.dumps(dict(reversed(vocab.items())), indent=0), encoding="utf-8")
    (tmp_path / "m.txt").write_text(merges.replace("\n", "\r\n") + "\n\n", encoding="utf-8")
    assert fingerprint(tmp_path / "v.json", tmp_path / "m.txt") == original
    first, second = sorted(vocab, key=vocab.get)[:2]
    (tmp_path / "swapped.json").write_text(json.dumps({**vocab, first: vocab[second], second: vocab[first]}))
    assert fingerprint(tmp_path / "swapped.json", demo_paths["merges"]) != original
    lines = merges.splitlines()
    (tmp_path / "cut.txt").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    assert fingerprint(demo_paths["vocab"], tmp_path / "cut.txt") != original
