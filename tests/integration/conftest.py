"""Fixtures shared by the integration tests (end-to-end runs of the entry points and tools)."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_helpers import convert, random_hf_model
from launchers import DIVISIBLE, TOKENIZER


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a Megatron checkpoint at model-parallel size 2, its Hugging Face export)."""
    root = tmp_path_factory.mktemp("generation")
    random_hf_model(root / "source")
    convert("from-hf", "--input", str(root / "source"), "--save", str(root / "ckpt"), "--model-parallel-size", "2",
            *DIVISIBLE)
    convert("to-hf", "--load", str(root / "ckpt"), "--output", str(root / "hf"), *TOKENIZER)
    return root / "ckpt", root / "hf"
