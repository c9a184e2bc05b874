"""Shared helpers for the data-pipeline tests: the demo corpus, small corpora, argument sets.

Loaded as a plugin (``pytest_plugins``) and imported; it has no asserts: PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from megatron.data.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference_bpe() -> type:
    """``ReferenceGPT2BPE`` from tools/reference_gpt2_bpe.py (shared with the benchmark)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_gpt2_bpe",
                                                  ROOT / "tools" / "reference_gpt2_bpe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReferenceGPT2BPE


@pytest.fixture(scope="session")
def demo_paths() -> dict[str, Path]:
    """The demo corpus and tokenizer, built once under the repository's data/demo."""
    from megatron.data.demo import ensure_demo_corpus

    return ensure_demo_corpus(ROOT / "data" / "demo")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_paths):
    from megatron.tokenizer import GPT2BPETokenizer

    return GPT2BPETokenizer(str(demo_paths["vocab"]), str(demo_paths["merges"]))


def write_json_lines(path: Path, texts: list[str], key: str = "text") -> Path:
    """Loose JSON with one ``{key: text}`` per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({key: text}) + "\n")
    return path


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` short English-like documents of varied length."""
    words = ("the model reads a token and the next one so that data flows through layers "
             "while every rank waits for its batch").split()
    documents = []
    for index in range(count):
        length = 5 + (index * 7 + seed) % 40
        documents.append(" ".join(words[(index + seed + k * 3) % len(words)] for k in range(length))
                         + f" number {index}.")
    return documents


def data_args(demo_paths: dict[str, Path], **overrides) -> DataConfig:
    """The data flags' defaults with the demo tokenizer and seed 1234; ``overrides`` by field."""
    from megatron.data.arguments import add_data_args, data_config

    args = add_data_args(argparse.ArgumentParser()).parse_args(
        ["--vocab-file", str(demo_paths["vocab"]), "--merge-file", str(demo_paths["merges"])])
    return dataclasses.replace(data_config(args, seed=1234), **overrides)


def run_data_tool(script: str, *arguments: str) -> tuple[int, str, str]:
    """Run ``tools/<script>`` (``launchers.run_tool``); returns (exit code, stdout, stderr)."""
    from launchers import run_tool

    completed = run_tool(f"tools/{script}", *arguments, check=False)
    return completed.returncode, completed.stdout, completed.stderr
