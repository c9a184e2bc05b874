"""WordPiece tokenizer and tool, sentence splitting, and BERT samples ([CLS] A [SEP] B [SEP])."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launchers import REPO

from megatron.data.bert_dataset import (
    BATCH_KEYS,
    BertDataset,
    BertSampleConfig,
    build_bert_datasets,
    build_sentence_corpus,
    collate_bert,
    ensure_demo_wordpiece,
    split_sentences,
    truncate_pair,
)
from megatron.data.config import DataConfig
from megatron.data.masking import MaskingConfig
from megatron.errors import ConfigError
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.wordpiece import WordPieceTokenizer, train_wordpiece

TEXTS = [f"The {animal} number {i} sat on the mat. It was happy! Was it? Yes, it purred loudly."
         for i, animal in enumerate(["cat", "dog", "bird", "fox"] * 25)]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece(TEXTS, 200, tmp_path_factory.mktemp("wp") / "vocab.txt", min_frequency=1)


def test_trained_vocab_loads_and_round_trips(small_vocab: Path) -> None:
    tokenizer = WordPieceTokenizer(small_vocab)
    assert (tokenizer.pad, tokenizer.unk, tokenizer.cls, tokenizer.sep, tokenizer.mask) == (0, 1, 2, 3, 4)
    assert tokenizer.eod == tokenizer.sep and tokenizer.vocab_size <= 200
    ids = tokenizer.tokenize("The CAT sat on the mat.")
    assert tokenizer.detokenize(ids) == "the cat sat on the mat."
    assert tokenizer.tokenize_batch(["The cat", "a dog"]) == [tokenizer.tokenize("The cat"), tokenizer.tokenize("a dog")]


def test_build_tokenizer_types(small_vocab: Path, tmp_path: Path) -> None:
    cased_vocab = train_wordpiece(TEXTS, 200, tmp_path / "cased.txt", lowercase=False, min_frequency=1)
    cased = build_tokenizer(argparse.Namespace(tokenizer_type="BertWordPieceCase", vocab_file=str(cased_vocab)))
    assert cased.name == "BertWordPieceCase" and cased.detokenize(cased.tokenize("The cat")) == "The cat"
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ConfigError, match=r"lacks \[PAD\]"):
        build_tokenizer(argparse.Namespace(tokenizer_type="BertWordPieceLowerCase", vocab_file=str(bad)))
    with pytest.raises(ConfigError, match="does not exist"):
        WordPieceTokenizer(tmp_path / "missing.txt")


def test_train_wordpiece_tool(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.json"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "vocab.txt"
    run = subprocess.run([sys.executable, "tools/train_wordpiece.py", "--input", str(corpus), "--output", str(out),
                          "--vocab-size", "150", "--min-frequency", "1"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert WordPieceTokenizer(out).vocab_size <= 150
    bad = subprocess.run([sys.executable, "tools/train_wordpiece.py", "--input", str(corpus), "--output", str(out),
                          "--vocab-size", "10"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--vocab-size 10 is too small" in bad.stderr and "Traceback" not in bad.stderr


def test_split_sentences() -> None:
    assert split_sentences("One two. Three? Four!\n\nFive six\nseven") == ["One two.", "Three?", "Four!", "Five six\nseven"]
    assert split_sentences("  ") == []


def test_truncate_pair_fits_and_is_seeded() -> None:
    first, second = np.arange(50), np.arange(100, 120)
    a, b = truncate_pair(first, second, 30, np.random.default_rng(0))
    assert len(a) + len(b) == 30 and abs(len(a) - len(b)) <= 1, "the longer segment is trimmed first"
    assert set(a) <= set(first) and set(b) <= set(second)
    again = truncate_pair(first, second, 30, np.random.default_rng(0))
    assert (again[0] == a).all() and (again[1] == b).all()


@pytest.mark.parametrize("head", ["sop", "nsp", "none"])
def test_samples_are_framed_padded_and_deterministic(small_vocab: Path, head: str) -> None:
    tokenizer = WordPieceTokenizer(small_vocab)
    corpus = build_sentence_corpus(TEXTS, tokenizer)
    assert corpus.num_documents == len(TEXTS) and len(corpus.sentence_starts) - 1 == 4 * len(TEXTS)
    config = BertSampleConfig(seq_length=24, seed=5, sentence_head=head)
    dataset = BertDataset("train", corpus, 0, corpus.num_documents, 300, tokenizer, config)
    labels = []
    for index in range(0, 300, 7):
        sample = dataset[index]
        length = int(sample["padding_mask"].sum())
        text, types = sample["text"], sample["types"]
        assert text[0] == tokenizer.cls and text[length - 1] == tokenizer.sep
        assert (text[length:] == tokenizer.pad).all() and not sample["loss_mask"][length:].any()
        seps = np.flatnonzero(text[:length] == tokenizer.sep)
        assert len(seps) == 2 and (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:length] == 1).all()
        assert not sample["loss_mask"][[0, *seps]].any(), "[CLS]/[SEP] are never masked"
        labels.append(int(sample["sentence_label"]))
        again = dataset[index]
        assert all((again[k] == sample[k]).all() for k in BATCH_KEYS)
    assert (0 < np.mean(labels) < 1) if head != "none" else not any(labels)
    batch = collate_bert([dataset[0], dataset[1]])
    assert batch["text"].shape == (2, 24) and batch["sentence_label"].shape == (2,)


def test_demo_datasets(demo_corpus: Path) -> None:
    vocab = ensure_demo_wordpiece(demo_corpus)
    tokenizer = WordPieceTokenizer(vocab)
    assert tokenizer.vocab_size == 8000
    data = DataConfig(train_data=["demo"], demo_data_dir=str(demo_corpus), seq_length=64, seed=1, split="949,50,1")
    sample = BertSampleConfig(seq_length=64, seed=1, sentence_head="sop",
                              masking=MaskingConfig(mask_prob=0.15, random_replace_prob=0.1, unmask_replace_prob=0.1))
    train, valid, test = build_bert_datasets(data, sample, tokenizer, (100, 10, 0))
    assert len(train) == 100 and len(valid) == 10 and test is None
    assert train[99]["text"].shape == (64,)
