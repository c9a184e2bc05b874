"""tools/preprocess_data.py through the tiktoken backend: the same .bin/.idx bytes as the Hugging
Face backend on the demo corpus, a timeline for the benchmark, lone surrogates as bad lines."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
from data_helpers import run_data_tool

from megatron.data.errors import DataError, LooseJSONError
from megatron.errors import TrainingAborted
from megatron.tokenizer import GPT2BPETokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from preprocess_data import preprocess  # noqa: E402

pytest_plugins = ["data_helpers"]  # demo_paths fixture


def test_demo_corpus_bytes_equal_the_hugging_face_backend(tmp_path, demo_paths):
    files = str(demo_paths["vocab"]), str(demo_paths["merges"])
    assert GPT2BPETokenizer(*files).backend == "tiktoken"
    outputs = {}
    for name, backend, workers in (("hf", "tokenizers", 1), ("tiktoken1", "auto", 1), ("tiktoken2", "auto", 2)):
        factory = functools.partial(GPT2BPETokenizer, *files, backend=backend)
        stats = preprocess(str(demo_paths["data"]), str(tmp_path / name), factory, ["text"],
                           append_eod=True, workers=workers, progress=False)
        prefix = tmp_path / f"{name}_text_document"
        outputs[name] = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
        times, done = zip(*stats.timeline)
        assert list(times) == sorted(times) and times[-1] <= stats.seconds
        assert list(done) == sorted(done) and done[-1] == stats.bytes
    assert len(outputs["hf"][0]) > 1_000_000
    assert outputs["tiktoken1"] == outputs["hf"] == outputs["tiktoken2"]


def test_lone_surrogate_is_a_bad_line(tmp_path, demo_paths):
    (tmp_path / "in.json").write_text('{"text": "fine"}\n{"text": "lone \\udc80"}\n', encoding="utf-8")
    common = ["--input", str(tmp_path / "in.json"), "--output-prefix", str(tmp_path / "out"),
              "--vocab-file", str(demo_paths["vocab"]), "--merge-file", str(demo_paths["merges"]),
              "--no-progress", "--workers", "2"]
    code, _, err = run_data_tool("preprocess_data.py", *common)
    assert code == 2 and "in.json:2: 'text' holds a lone surrogate" in err and "Traceback" not in err
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    stats = preprocess(str(tmp_path / "in.json"), str(tmp_path / "out"), factory, ["text"],
                       append_eod=True, workers=2, skip_bad_lines=True, progress=False)
    assert (stats.documents, stats.bad_lines) == (1, 1)


@pytest.mark.parametrize("block_bytes", [1, 23, 64])
def test_small_blocks_write_the_same_bytes_and_name_the_files_line(monkeypatch, tmp_path, demo_paths,
                                                                   block_bytes: int) -> None:
    """Tasks are (offset, length) of whole lines that the workers read themselves: any block size
    gives the same output, blank lines and an unterminated last line included, and a bad line in a
    later block is named by its line in the file (the worker only knows its line in the block)."""
    import preprocess_data

    lines = ['{"text": "first document"}', "", '{"text": "second, a longer one"}', "   ", '{"text": ""}',
             '{"text": "third \\u00e9"}', '{"text": "last, unterminated"}']
    (tmp_path / "in.json").write_text("\n".join(lines), encoding="utf-8")
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    outputs = {}
    for size in (1 << 19, block_bytes):
        monkeypatch.setattr(preprocess_data, "BYTES_PER_TASK", size)
        for workers in (1, 2):
            stats = preprocess(str(tmp_path / "in.json"), str(tmp_path / f"out{size}_{workers}"), factory, ["text"],
                               append_eod=True, workers=workers, progress=False)
            assert (stats.documents, stats.empty["text"]) == (5, 1)
            prefix = tmp_path / f"out{size}_{workers}_text_document"
            outputs[size, workers] = prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes()
    assert len(set(outputs.values())) == 1

    (tmp_path / "bad.json").write_text("\n".join(lines[:5] + ["{not json"] + lines[5:]) + "\n", encoding="utf-8")
    with pytest.raises(LooseJSONError, match=r"bad\.json:6: malformed JSON"):
        preprocess(str(tmp_path / "bad.json"), str(tmp_path / "bad"), factory, ["text"], append_eod=True,
                   workers=2, progress=False)
    assert not list(tmp_path.glob("bad_*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_input_changed_while_it_is_read_is_refused(monkeypatch, tmp_path, demo_paths, workers: int) -> None:
    """Workers open the input for each block: a corpus replaced or appended to mid-run would mix
    two versions silently; now the run stops with one line and writes nothing."""
    import preprocess_data

    source = tmp_path / "in.json"
    source.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(40)), encoding="utf-8")
    monkeypatch.setattr(preprocess_data, "BYTES_PER_TASK", 64)
    tasks = preprocess_data._tasks

    def change_the_input_after_the_first_task(*args, **kwargs):
        for number, task in enumerate(tasks(*args, **kwargs)):
            yield task
            if number == 0:  # before the second task is handed out (and read)
                with open(source, "a", encoding="utf-8") as handle:
                    handle.write('{"text": "appended"}\n')

    monkeypatch.setattr(preprocess_data, "_tasks", change_the_input_after_the_first_task)
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    with pytest.raises(DataError, match="in.json changed while it was being preprocessed"):
        preprocess(str(source), str(tmp_path / "out"), factory, ["text"], append_eod=True, workers=workers,
                   progress=False)
    assert not list(tmp_path.glob("out*"))


def test_a_killed_worker_is_one_error_and_nothing_is_written(monkeypatch, tmp_path, demo_paths) -> None:
    """A worker killed mid-run (the kernel's out-of-memory killer) used to hang the run forever:
    multiprocessing.Pool loses the task. Now the run stops with one line naming the worker and the
    signal, exit status 1, and no output or partial file is left."""
    import os
    import signal

    import preprocess_data

    class DiesOnPoison(GPT2BPETokenizer):
        def tokenize_batch_numpy(self, texts, dtype):
            if any("poison" in text for text in texts):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().tokenize_batch_numpy(texts, dtype)

    source = tmp_path / "in.json"
    source.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(40)) + '{"text": "poison"}\n'
                      + "".join(f'{{"text": "after {i}"}}\n' for i in range(40)), encoding="utf-8")
    monkeypatch.setattr(preprocess_data, "BYTES_PER_TASK", 64)
    factory = functools.partial(DiesOnPoison, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    with pytest.raises(preprocess_data.WorkerDied, match=r"preprocessing worker process \d+ was killed by SIGKILL "
                                                         r".*; nothing was written"):
        preprocess(str(source), str(tmp_path / "out"), factory, ["text"], append_eod=True, workers=2,
                   progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.json"]


def test_a_key_named_twice_is_one_output(tmp_path, demo_paths) -> None:
    """Hostile review: ``--json-keys text text`` wrote every document twice (the old code, a dict,
    wrote it once)."""
    source = tmp_path / "in.json"
    source.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(30)), encoding="utf-8")
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    outputs = []
    for keys in (["text"], ["text", "text"]):
        prefix = tmp_path / f"out{len(keys)}"
        stats = preprocess(str(source), str(prefix), factory, keys, append_eod=True, workers=1, progress=False)
        assert stats.documents == 30
        document = tmp_path / f"out{len(keys)}_text_document"
        outputs.append((document.with_suffix(".bin").read_bytes(), document.with_suffix(".idx").read_bytes()))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_is_one_line_and_leaves_nothing(monkeypatch, tmp_path, demo_paths, workers: int) -> None:
    """Hostile review: a full output disk was an OSError traceback. The write is made to fail as a
    full disk does (ENOSPC from the .bin's write); the run stops with one line naming the directory."""
    import errno

    import preprocess_data

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    calls = []
    real = IndexedDatasetBuilder.add_documents

    def fills_up(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tokens, lengths)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", fills_up)
    monkeypatch.setattr(preprocess_data, "BYTES_PER_TASK", 64)
    source = tmp_path / "in.json"
    source.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(40)), encoding="utf-8")
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    with pytest.raises(TrainingAborted, match=rf"--output-prefix: {tmp_path} is full \(No space left on device\); "
                                        "nothing was written"):
        preprocess(str(source), str(tmp_path / "out"), factory, ["text"], append_eod=True, workers=workers,
                   progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.json"]


def test_a_deeply_nested_line_is_a_bad_line_not_a_crash(tmp_path, demo_paths) -> None:
    """Hostile review: orjson 3.8 crashed the process (SIGSEGV) on a valid line nested 150,000
    deep, and json raised a RecursionError traceback at 1,000 levels even with --skip-bad-lines.
    Now such a line is a bad line: named, or skipped and counted."""
    deep = b'{"text": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"
    source = tmp_path / "in.json"
    source.write_bytes(b'{"text": "before"}\n' + deep + b'{"text": "after"}\n')
    factory = functools.partial(GPT2BPETokenizer, str(demo_paths["vocab"]), str(demo_paths["merges"]))
    for workers in (1, 2):
        with pytest.raises(LooseJSONError, match=r"in\.json:2: malformed JSON \(nested too deeply\)"):
            preprocess(str(source), str(tmp_path / "out"), factory, ["text"], append_eod=True, workers=workers,
                       progress=False)
        stats = preprocess(str(source), str(tmp_path / "out"), factory, ["text"], append_eod=True,
                           workers=workers, skip_bad_lines=True, progress=False)
        assert (stats.documents, stats.bad_lines) == (2, 1)
