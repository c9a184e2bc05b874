"""The built-in demo corpus: English docstrings of the standard library and installed packages.

``ensure_demo_corpus()`` writes, once, ``demo.json`` (loose JSON, one module's docstrings per
document, at least 2 MB) plus ``gpt2-vocab.json``/``gpt2-merges.txt``, a byte-level BPE trained on
it. Source files are parsed with ``ast`` (never imported: no side effects), in sorted order, so
the corpus is the same on every machine with the same Python and packages.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import shutil
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from megatron.data.cache import build_once, make_cache_dir
from megatron.tokenizer.training import train_byte_level_bpe

DEMO_VOCAB_SIZE = 8000
MIN_BYTES = 2_000_000
TARGET_BYTES = 3_000_000
PACKAGES = ("numpy", "torch", "deepspeed", "tokenizers", "nltk", "tqdm", "ftfy", "datasketch",
            "safetensors", "tensorboard", "matplotlib", "regex")
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "_vendor", "vendored"}
DEMO_DIR_FIX = "pass --demo-data-dir a writable directory for the demo corpus"
FILES = {"data": "demo.json", "vocab": "gpt2-vocab.json", "merges": "gpt2-merges.txt"}


def source_roots() -> list[Path]:
    """The stdlib directory, then each installed package of ``PACKAGES`` (sorted)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in sorted(PACKAGES):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))))
    return roots


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not SKIP_PARTS.intersection(path.relative_to(root).parts):
            yield path


def module_docstrings(path: Path) -> str:
    """The module's, classes' and functions' docstrings of ``path``, cleaned, blank-line joined."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    docs = (ast.get_docstring(node, clean=False) for node in nodes)
    cleaned = (inspect.cleandoc(doc) for doc in docs if doc and len(doc.split()) >= 5)
    return "\n\n".join(doc for doc in cleaned if doc.isascii())


def harvest(target_bytes: int = TARGET_BYTES) -> list[str]:
    """Documents (one per module with docstrings) until ``target_bytes`` of text."""
    documents, total = [], 0
    for number, root in enumerate(source_roots()):
        # The stdlib alone would fill the corpus; keep a third for the installed packages.
        limit = target_bytes * 2 // 3 if number == 0 else target_bytes
        for path in _python_files(root):
            if total >= limit:
                break
            text = module_docstrings(path)
            if text:
                documents.append(text)
                total += len(text.encode("utf-8"))
        if total >= target_bytes:
            return documents
    if total < MIN_BYTES:
        raise RuntimeError(f"only {total} bytes of docstrings found; the demo needs {MIN_BYTES}")
    return documents


def _is_complete(marker: Path) -> bool:
    return marker.exists() and all((marker.parent / name).exists() for name in FILES.values())


def build_demo_corpus(output_dir: str | os.PathLike, scratch: Path) -> None:
    """Write the corpus and its tokenizer into ``scratch``, then move them into ``output_dir``."""
    documents = harvest()
    with open(scratch / FILES["data"], "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}) + "\n")
    train_byte_level_bpe(documents, DEMO_VOCAB_SIZE, scratch, prefix="gpt2")
    for name in FILES.values():
        os.replace(scratch / name, Path(output_dir) / name)


def ensure_demo_corpus(output_dir: str | os.PathLike = "data/demo") -> dict[str, Path]:
    """Build the demo corpus in ``output_dir`` unless already there; returns its paths.

    Safe to call from every rank at once: one builds, the others wait on a file lock. Files are
    moved in only when complete, and a ``.complete`` marker written last says the set is whole.
    """
    output_dir = make_cache_dir(output_dir, DEMO_DIR_FIX)
    marker = output_dir / ".complete"

    def build(tmp_marker: Path) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=output_dir))
        try:
            build_demo_corpus(output_dir, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tmp_marker.write_text("demo corpus complete\n")

    build_once(marker, build, is_complete=_is_complete, fix=DEMO_DIR_FIX)
    return {key: output_dir / name for key, name in FILES.items()}
