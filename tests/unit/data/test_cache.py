"""Caches built once across racing processes and never left half-written by a killed build."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from data_helpers import sentences, write_json_lines

from megatron.data.cache import build_once
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.loose_json import lazy_cache_dir, tokenize_cached
from megatron.tokenizer import GPT2BPETokenizer

pytest_plugins = ["data_helpers"]  # demo_paths, demo_tokenizer fixtures

CONTEXT = multiprocessing.get_context("spawn")


def _lazy_build(corpus: str, vocab: str, merges: str, results) -> None:
    tokenizer = GPT2BPETokenizer(vocab, merges)
    documents = tokenize_cached(corpus, tokenizer)
    results.put([documents.get(i).tolist() for i in range(len(documents))])


def _lazy_build_slowly(corpus: str, vocab: str, merges: str) -> None:
    """The real lazy build, slowed down so that the test can kill it midway."""
    tokenizer = GPT2BPETokenizer(vocab, merges)
    fast = tokenizer.tokenize_batch

    def slow(texts):
        time.sleep(0.5)
        return fast(texts)

    tokenizer.tokenize_batch = slow
    tokenize_cached(corpus, tokenizer)


def _slow_build(target: str, log: str, seconds: float) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        tmp.mkdir()
        (tmp / "part").write_text("half")
        time.sleep(seconds)
        (tmp / "done").write_text("whole")

    build_once(target, build)


def _index_build(corpus: str, vocab: str, merges: str, cache: str, results) -> None:
    from megatron.data.loose_json import tokenize_in_memory

    documents = tokenize_in_memory(corpus, GPT2BPETokenizer(vocab, merges))
    dataset = GPT2Dataset("train", documents, 0, len(documents.sizes), 1200, 16, 7, cache)
    results.put(np.stack([dataset[i]["text"] for i in range(1200)]).tolist())


def run_racers(target, args_list) -> list:
    results = CONTEXT.Queue()
    processes = [CONTEXT.Process(target=target, args=(*args, results)) for args in args_list]
    for process in processes:
        process.start()
    outputs = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outputs


def test_lazy_cache_two_ranks_race(tmp_path, demo_paths):
    corpus = write_json_lines(tmp_path / "c.json", sentences(400))
    files = (str(corpus), str(demo_paths["vocab"]), str(demo_paths["merges"]))
    first, second = run_racers(_lazy_build, [files, files])
    assert first == second and len(first) == 400
    cache_root = tmp_path / "c.cache"
    assert len([p for p in cache_root.iterdir() if not p.name.endswith(".lock")]) == 1


def test_sample_index_cache_two_ranks_race(tmp_path, demo_paths):
    corpus = write_json_lines(tmp_path / "c.json", sentences(200))
    cache = tmp_path / "index"
    files = (str(corpus), str(demo_paths["vocab"]), str(demo_paths["merges"]), str(cache))
    first, second = run_racers(_index_build, [files, files])
    assert first == second
    epochs = sorted(p.name for p in cache.iterdir() if p.suffix == ".npz")
    assert len(epochs) >= 2 and not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_build_once_survives_killed_builder(tmp_path):
    target, log = tmp_path / "cache", tmp_path / "log"
    victim = CONTEXT.Process(target=_slow_build, args=(str(target), str(log), 60))
    victim.start()
    deadline = time.time() + 60
    while not list(tmp_path.glob(".cache.tmp*/part")) and time.time() < deadline:
        time.sleep(0.05)
    victim.kill()
    victim.join()
    assert not target.exists()  # no half cache under the real name
    racers = [CONTEXT.Process(target=_slow_build, args=(str(target), str(log), 0.5)) for _ in range(2)]
    for process in racers:
        process.start()
    for process in racers:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert (target / "done").read_text() == "whole"
    assert len(log.read_text().split()) == 2  # the killed build, then exactly one more
    assert not list(tmp_path.glob(".cache.tmp*"))


def test_lazy_cache_survives_killed_build(tmp_path, demo_paths):
    corpus = write_json_lines(tmp_path / "c.json", sentences(5000))
    tokenizer = GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    target = lazy_cache_dir(corpus, tokenizer, "text", False, None)
    files = (str(corpus), str(demo_paths["vocab"]), str(demo_paths["merges"]))
    victim = CONTEXT.Process(target=_lazy_build_slowly, args=files)
    victim.start()
    deadline = time.time() + 60
    while not list(target.parent.glob(f".{target.name}.tmp*/*.bin")) and time.time() < deadline:
        time.sleep(0.01)
    assert victim.is_alive(), "the build finished before it could be killed"
    victim.kill()
    victim.join()
    assert not target.exists()
    documents = tokenize_cached(corpus, tokenizer)
    assert len(documents) == 5000
    assert documents.get(4999).tolist() == tokenizer.tokenize(sentences(5000)[4999]) + [tokenizer.eod]
    assert not list(target.parent.glob(f".{target.name}.tmp*"))


def test_a_damaged_sample_index_cache_is_rebuilt(tmp_path, demo_paths, capsys):
    """A truncated .index-cache/*.npz was a BadZipFile traceback; it is a cache, so rebuild it."""
    from megatron.data.loose_json import tokenize_in_memory

    corpus = write_json_lines(tmp_path / "c.json", sentences(200))
    documents = tokenize_in_memory(corpus, GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"])))
    cache = tmp_path / "index"
    expected = GPT2Dataset("train", documents, 0, len(documents.sizes), 50, 16, 7, cache)[49]["text"].tolist()
    for damage in (lambda data: data[: len(data) // 2], lambda data: b"not a zip at all"):
        for path in cache.glob("*.npz"):
            path.write_bytes(damage(path.read_bytes()))
        capsys.readouterr()
        rebuilt = GPT2Dataset("train", documents, 0, len(documents.sizes), 50, 16, 7, cache)
        assert rebuilt[49]["text"].tolist() == expected
        err = capsys.readouterr().err
        assert "is damaged" in err and "rebuilding it" in err
