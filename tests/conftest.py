from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    """The built-in demo corpus and tokenizer, built once under data/demo."""
    from launchers import DEMO_DIR

    from megatron.data.demo import ensure_demo_corpus

    ensure_demo_corpus(DEMO_DIR)
    return DEMO_DIR
