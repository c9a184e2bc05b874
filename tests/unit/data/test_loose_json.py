"""Loose-JSON datasets: GPT-2 sampling semantics, determinism, splits and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import data_args, sentences, write_json_lines

from megatron.data import LooseJSONError, build_train_valid_test_datasets
from megatron.data.arguments import validate_data_args
from megatron.data.errors import DataError
from megatron.data.loose_json import ReadStats, iter_json_texts

pytest_plugins = ["data_helpers"]  # demo_paths, demo_tokenizer fixtures


def build(demo_paths, tokenizer, path, counts, **overrides):
    args = data_args(demo_paths, train_data=[str(path)], seq_length=16, **overrides)
    return build_train_valid_test_datasets(args, tokenizer, counts)


def test_samples_are_windows_of_eod_joined_documents(tmp_path, demo_paths, demo_tokenizer):
    texts = sentences(30)
    write_json_lines(tmp_path / "c.json", texts)
    train, _, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (200, 0, 0), split="1,0,0")
    docs = [demo_tokenizer.tokenize(t) + [demo_tokenizer.eod] for t in texts]
    per_epoch = (sum(map(len, docs)) - 1) // 16
    assert train.samples_per_epoch == per_epoch
    order, _, sample_order = train._epoch(0)
    stream = np.concatenate([docs[i] for i in order])
    for index in range(per_epoch):
        start = sample_order[index] * 16
        assert np.array_equal(train[index]["text"], stream[start:start + 17])
    # Each epoch holds every window exactly once.
    assert sorted(sample_order.tolist()) == list(range(per_epoch))


def test_sample_does_not_depend_on_run_length_and_follows_seed(tmp_path, demo_paths, demo_tokenizer):
    write_json_lines(tmp_path / "c.json", sentences(40))
    short, v1, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (30, 5, 0))
    long, v2, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (500, 9, 0))
    assert len(short) == 30 and len(long) == 500 and long.num_epochs > 1
    assert all(np.array_equal(short[i]["text"], long[i]["text"]) for i in range(30))
    assert all(np.array_equal(v1[i]["text"], v2[i]["text"]) for i in range(5))
    other, _, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (30, 5, 0), seed=99)
    assert any(not np.array_equal(short[i]["text"], other[i]["text"]) for i in range(30))
    # Epochs are shuffled independently.
    assert not np.array_equal(long._epoch(0)[0], long._epoch(1)[0])


def test_split_is_by_documents(tmp_path, demo_paths, demo_tokenizer):
    texts = [f"document {i} " + "word " * 40 for i in range(100)]
    write_json_lines(tmp_path / "c.json", texts)
    train, valid, test = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (10, 10, 10),
                               split="80,10,10")
    assert (len(train.doc_ids), len(valid.doc_ids), len(test.doc_ids)) == (80, 10, 10)
    assert valid.doc_ids[0] == 80 and test.doc_ids[-1] == 99


def test_lazy_loader_matches_in_memory(tmp_path, demo_paths, demo_tokenizer):
    write_json_lines(tmp_path / "c.json", sentences(50))
    eager, _, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (40, 0, 0))
    lazy, _, _ = build(demo_paths, demo_tokenizer, tmp_path / "c.json", (40, 0, 0), lazy_loader=True)
    assert all(np.array_equal(eager[i]["text"], lazy[i]["text"]) for i in range(40))
    assert list((tmp_path / "c.cache").iterdir())  # cache beside the file


def test_bad_lines_name_file_and_line(tmp_path, demo_paths, demo_tokenizer):
    path = tmp_path / "bad.json"
    path.write_text('{"text": "one two three"}\n\n{"text": oops}\n{"text": ""}\n{"body": "x"}\n'
                    '{"text": "four five"}\n', encoding="utf-8")
    with pytest.raises(LooseJSONError, match=r"bad.json:3: malformed JSON.*--skip-bad-lines"):
        list(iter_json_texts(path))
    stats = ReadStats()
    assert list(iter_json_texts(path, skip_bad_lines=True, stats=stats)) == ["one two three", "four five"]
    assert (stats.documents, stats.empty, stats.bad_lines) == (2, 1, 2)
    with pytest.raises(LooseJSONError, match=r"bad.json:1: no 'body' key .*--text-key"):
        list(iter_json_texts(path, text_key="body"))
    with pytest.raises(LooseJSONError, match="malformed"):
        build(demo_paths, demo_tokenizer, path, (5, 0, 0))
    # An unpaired \u escape decodes to a lone surrogate, which no tokenizer can encode.
    path.write_text('{"text": "pair \\ud83d\\ude00 fine"}\n{"text": "lone \\ud800 x"}\n', encoding="utf-8")
    with pytest.raises(LooseJSONError, match=r"bad.json:2: 'text' holds a lone surrogate.*--skip-bad-lines"):
        list(iter_json_texts(path))
    assert list(iter_json_texts(path, skip_bad_lines=True)) == ["pair \U0001F600 fine"]


def test_too_little_data_and_missing_file(tmp_path, demo_paths, demo_tokenizer):
    write_json_lines(tmp_path / "tiny.json", ["a b"])
    with pytest.raises(DataError, match="lower --seq-length"):
        build(demo_paths, demo_tokenizer, tmp_path / "tiny.json", (5, 0, 0), split="1,0,0")
    with pytest.raises(LooseJSONError, match="missing.json does not exist"):
        build(demo_paths, demo_tokenizer, tmp_path / "missing.json", (5, 0, 0))


def test_registered_corpus_names(tmp_path, demo_paths, demo_tokenizer):
    (tmp_path / "webtext").mkdir()
    write_json_lines(tmp_path / "webtext" / "data.json", sentences(30))
    args = data_args(demo_paths, train_data=["webtext"], data_dir=str(tmp_path), seq_length=16)
    train, _, _ = build_train_valid_test_datasets(args, demo_tokenizer, (5, 0, 0))
    assert len(train) == 5
    args = data_args(demo_paths, train_data=["demo"], demo_data_dir=str(demo_paths["data"].parent),
                     seq_length=64, lazy_loader=True)
    train, valid, test = build_train_valid_test_datasets(args, demo_tokenizer, (8, 4, 2))
    assert (len(train), len(valid), len(test)) == (8, 4, 2)
    assert train[3]["text"].shape == (65,)


@pytest.mark.parametrize("overrides, message", [
    ({"train_data": None}, "no training data"),
    ({"split": "9,x"}, "--split '9,x'"),
    ({"split": "0,0,0"}, "positive sum"),
    ({"train_data": None, "data_path": ["0.3", "A", "B"]}, "weight/prefix"),
    ({"train_data": None, "data_path": ["x", "A"]}, "weight 'x' is not a number"),
    ({"vocab_file": "/nonexistent/vocab.json"}, "vocab.json does not exist"),
    ({"merge_file": None}, "--merge-file is required"),
    ({"seq_length": 0}, "--seq-length must be positive"),
])
def test_validate_data_args(demo_paths, overrides, message):
    args = data_args(demo_paths, **{"train_data": ["demo"], **overrides})
    with pytest.raises(ValueError, match=message):
        validate_data_args(args)


def test_validate_accepts_demo_defaults(demo_paths):
    validate_data_args(data_args(demo_paths, train_data=["demo"]))


@pytest.mark.parametrize("line", [
    b'{"text": "plain"}', b' {"text": "padded"} \r', b'{"text": "a", "text": "duplicate: the last wins"}',
    b'{"text": "\\ud83d\\ude00 a surrogate pair"}', b'{"text": "big number", "n": 123456789012345678901234567890}',
    b'{"text": "huge float", "n": 1e400}', b'{"text": NaN}', b'{"text": "lone \\ud800"}', b'{"text": "bad \xff"}',
    b'{"txt": "no key"}', b'["text"]', b'"text"', b'null', b'{"text": 5}', b'{"text": "a"} trailing',
    b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "ctrl \x01"}', b'{"text": "nested", "x": ' + b"[" * 1005 + b"]" * 1005 + b"}",
    b'{"text": "big", "n": ' + b"9" * 5000 + b"}"])
def test_parse_json_line_decides_as_the_json_module(line: bytes) -> None:
    """The orjson fast path never changes a verdict: each line gives the text ``json`` gives, or
    the same error (orjson refuses NaN, lone surrogates and big numbers; ``json`` then decides).
    A line ``json`` cannot read at all (nested past its recursion limit, hostile review; an integer
    past Python's digit limit) is a bad line, not a traceback."""
    import json

    from megatron.data.loose_json import parse_json_line

    def reference() -> str:
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # nested too deep, a number past the digit limit: errors too
            return "error"
        text = record.get("text") if isinstance(record, dict) else None
        ok = isinstance(text, str)
        try:
            ok = ok and bool(text.encode("utf-8"))
        except UnicodeEncodeError:
            ok = False
        return text if ok else "error"

    try:
        got = parse_json_line(line, "c.json", 3, "text")
    except LooseJSONError as error:
        assert str(error).startswith("c.json:3: ")
        got = "error"
    assert got == reference()
