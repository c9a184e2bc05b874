"""Megatron mmap .bin/.idx: byte-exact output of the tool, foreign writers, clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from data_helpers import data_args, run_data_tool, sentences, write_json_lines

from megatron.data import IndexedDatasetError, build_train_valid_test_datasets
from megatron.data.errors import DataError
from megatron.data.indexed_dataset import MMapIndexedDataset

pytest_plugins = ["data_helpers"]  # demo_paths, demo_tokenizer fixtures


def minimal_read(prefix: str) -> tuple[int, list[np.ndarray]]:
    """Independent reader of the format: (dtype code, documents) with every field checked."""
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_count = struct.unpack("<QBQQ", raw[9:34])
    assert version == 1
    sizes = struct.unpack(f"<{count}i", raw[34:34 + 4 * count])
    pointers = struct.unpack(f"<{count}q", raw[34 + 4 * count:34 + 12 * count])
    doc_idx = struct.unpack(f"<{doc_count}q", raw[34 + 12 * count:])
    dtype = {4: "<i4", 8: "<u2"}[code]
    itemsize = np.dtype(dtype).itemsize
    assert list(pointers) == [sum(sizes[:i]) * itemsize for i in range(count)]
    assert list(doc_idx) == list(range(count + 1))
    data = open(prefix + ".bin", "rb").read()
    assert len(data) == sum(sizes) * itemsize
    docs = [np.frombuffer(data, dtype, size, offset) for size, offset in zip(sizes, pointers)]
    return code, docs


def minimal_write(prefix: str, documents: list[list[int]], dtype: str = "<u2", code: int = 8) -> None:
    """Independent writer of the format (what another Megatron tool would produce)."""
    sizes = [len(doc) for doc in documents]
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as handle:
        for doc in documents:
            handle.write(np.asarray(doc, dtype).tobytes())
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(sizes), len(sizes) + 1))
        handle.write(struct.pack(f"<{len(sizes)}i", *sizes))
        handle.write(struct.pack(f"<{len(sizes)}q", *[sum(sizes[:i]) * itemsize for i in range(len(sizes))]))
        handle.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))


@pytest.mark.parametrize("workers", [1, 2])
def test_tool_output_is_the_format(tmp_path, demo_paths, demo_tokenizer, workers):
    texts = sentences(60) + ["", "   "] + ["ünïcödé ✓ text"]
    write_json_lines(tmp_path / "in.json", texts)
    code, out, err = run_data_tool("preprocess_data.py", "--input", str(tmp_path / "in.json"),
                              "--output-prefix", str(tmp_path / "out"), "--vocab-file",
                              str(demo_paths["vocab"]), "--merge-file", str(demo_paths["merges"]),
                              "--tokenizer-type", "GPT2BPETokenizer", "--append-eod",
                              "--workers", str(workers), "--json-keys", "text")
    assert code == 0, err
    assert "MB/s" in out and "docs/s" in out and "2 empty" in out
    dtype_code, docs = minimal_read(str(tmp_path / "out_text_document"))
    assert dtype_code == 8  # uint16: vocab 8000 < 65500
    expected = [demo_tokenizer.tokenize(t) + [demo_tokenizer.eod] for t in texts if t.strip()]
    assert [doc.tolist() for doc in docs] == expected
    reader = MMapIndexedDataset(tmp_path / "out_text_document")
    assert [reader[i].tolist() for i in range(len(reader))] == expected


def test_tool_user_errors_are_one_line(tmp_path, demo_paths):
    (tmp_path / "bad.json").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    common = ["--output-prefix", str(tmp_path / "o"), "--vocab-file", str(demo_paths["vocab"]),
              "--merge-file", str(demo_paths["merges"]), "--no-progress"]
    code, _, err = run_data_tool("preprocess_data.py", "--input", str(tmp_path / "bad.json"), *common)
    assert code == 2 and "bad.json:2: malformed JSON" in err and "Traceback" not in err
    assert not list(tmp_path.glob("o_*"))  # nothing half-written
    code, out, _ = run_data_tool("preprocess_data.py", "--input", str(tmp_path / "bad.json"),
                            "--skip-bad-lines", *common)
    assert code == 0 and "1 bad lines skipped" in out
    code, _, err = run_data_tool("preprocess_data.py", "--input", str(tmp_path / "bad.json"),
                            *common[:4], "--merge-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt does not exist" in err and "Traceback" not in err
    # Issue 16: an empty input wrote an empty dataset and exited 0.
    for name, content in (("empty.json", ""), ("blank.json", '{"text": ""}\n')):
        (tmp_path / name).write_text(content)
        code, _, err = run_data_tool("preprocess_data.py", "--input", str(tmp_path / name), "--output-prefix",
                                     str(tmp_path / "empty"), *common[2:])
        assert code == 2 and f"{name} holds no documents with text" in err and "Traceback" not in err
        assert not list(tmp_path.glob("empty_*"))


def test_foreign_writer_loads_in_training(tmp_path, demo_paths, demo_tokenizer):
    documents = [demo_tokenizer.tokenize(t) + [demo_tokenizer.eod] for t in sentences(200)]
    minimal_write(str(tmp_path / "ext"), documents)
    args = data_args(demo_paths, data_path=[str(tmp_path / "ext")], seq_length=16, split="90,10,0")
    train, valid, test = build_train_valid_test_datasets(args, demo_tokenizer, (50, 8, 0))
    assert (len(train), len(valid), test) == (50, 8, None)
    sample = train[7]["text"]
    assert sample.dtype == np.int64 and sample.shape == (17,)
    stream = np.concatenate([np.asarray(d) for d in documents])
    # Every sample is a contiguous window of some document order: its tokens exist in the data.
    assert set(sample.tolist()) <= set(stream.tolist())


def test_int32_dataset_and_blend(tmp_path, demo_paths, demo_tokenizer):
    docs_a = [demo_tokenizer.tokenize(t) + [demo_tokenizer.eod] for t in sentences(80)]
    docs_b = [[7] * 30 + [demo_tokenizer.eod] for _ in range(40)]
    minimal_write(str(tmp_path / "a"), docs_a, "<i4", 4)
    minimal_write(str(tmp_path / "b"), docs_b)
    args = data_args(demo_paths, data_path=["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")],
                     seq_length=8, split="1,0,0")
    train, valid, _ = build_train_valid_test_datasets(args, demo_tokenizer, (400, 10, 0))
    assert valid is None
    from_b = sum(set(train[i]["text"].tolist()) <= {7, demo_tokenizer.eod} for i in range(400))
    assert 280 <= from_b <= 320  # 75 % of samples (all-7 windows can only come from b)
    longer, _, _ = build_train_valid_test_datasets(args, demo_tokenizer, (900, 10, 0))
    assert all(np.array_equal(train[i]["text"], longer[i]["text"]) for i in range(400))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"PK\x03\x04" + bytes(40)), "not a Megatron mmap index"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-5]), "truncated"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "truncated"),
    (lambda p: p.with_suffix(".bin").unlink(), "does not exist"),
    (lambda p: p.with_suffix(".idx").write_bytes(
        p.with_suffix(".idx").read_bytes()[:9] + struct.pack("<Q", 2)
        + p.with_suffix(".idx").read_bytes()[17:]), "version 2"),
    (lambda p: p.with_suffix(".idx").write_bytes(
        p.with_suffix(".idx").read_bytes()[:17] + b"\x06" + p.with_suffix(".idx").read_bytes()[18:]),
     "dtype code 6"),
])
def test_damaged_files_are_clear_errors(tmp_path, damage, message):
    minimal_write(str(tmp_path / "d"), [[1, 2, 3], [4, 5]])
    damage(tmp_path / "d.x")
    with pytest.raises(IndexedDatasetError, match=message) as info:
        MMapIndexedDataset(tmp_path / "d")
    assert "d.idx" in str(info.value) or "d.bin" in str(info.value)


def test_token_ids_beyond_vocab(tmp_path, demo_paths, demo_tokenizer):
    minimal_write(str(tmp_path / "big"), [[1, 2, 3] * 20, [9000, 1, 2] * 20])
    args = data_args(demo_paths, data_path=[str(tmp_path / "big")], seq_length=8)
    with pytest.raises(DataError, match="token id 9000 but the tokenizer has 8000"):
        build_train_valid_test_datasets(args, demo_tokenizer, (10, 0, 0))
