"""Checkpoints for tests: tools/convert_checkpoint.py, and a random Hugging Face GPT-2 shaped like
``launchers.TINY_GPT2`` with the demo tokenizer."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch
from launchers import DEMO_DIR, run_tool


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    """One SHA-256 of every path and file under ``root`` (names in ``skip`` left out): equal
    before and after means nothing there was changed, added or removed."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name in skip:
            continue
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_tool("tools/convert_checkpoint.py", *args, check=check)


def random_hf_model(directory: Path, std: float = 0.3) -> Path:
    """A random GPT2LMHeadModel shaped like TINY_GPT2 (demo vocabulary), with the demo tokenizer."""
    import shutil

    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=8000, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     initializer_range=std, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    eod = json.loads((DEMO_DIR / "gpt2-vocab.json").read_text())["<|endoftext|>"]
    config.bos_token_id = config.eos_token_id = eod
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    shutil.copyfile(DEMO_DIR / "gpt2-vocab.json", directory / "vocab.json")
    shutil.copyfile(DEMO_DIR / "gpt2-merges.txt", directory / "merges.txt")
    return directory
