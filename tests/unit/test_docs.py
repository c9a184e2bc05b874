"""The Python names the documentation cites (``megatron.x.y`` in backticks) exist: the
restructure moved modules (``megatron.training.pretrain`` became ``megatron.training.loop.pretrain``)
and a reader following the docs should not meet an ImportError."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NAME = re.compile(r"`(megatron(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def cited_names() -> list[tuple[str, str]]:
    return sorted({(match.group(1), doc.name) for doc in DOCS for match in NAME.finditer(doc.read_text())
                   if not match.group(1).endswith(".py")})


@pytest.mark.parametrize("name,doc", cited_names())
def test_cited_name_exists(name: str, doc: str) -> None:
    assert _resolves(name), f"{doc} cites {name}, which does not exist"


PATH = re.compile(r"\b((?:tests|tools|scripts|megatron)/[\w./-]*\.(?:py|sh|json))\b")


def cited_paths() -> list[tuple[str, str]]:
    return sorted({(match.group(1), doc.name) for doc in DOCS for match in PATH.finditer(doc.read_text())})


def test_cited_files_exist() -> None:
    """Test and tool files the docs name exist (the restructure moved tests/test_*.py into
    tests/unit and tests/integration, and the docs kept the old paths)."""
    missing = [f"{doc} cites {path}" for path, doc in cited_paths() if not (REPO / path).exists()]
    assert not missing, "; ".join(missing)
