"""Checkpoints for tests: tools/convert_checkpoint.py, and a random Hugging Face GPT-2 shaped like
``launchers.TINY_GPT2`` with the demo tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import torch
from launchers import DEMO_DIR, NO_DROPOUT, TINY_GPT2, losses, run_script, run_tool

RESUME_TOLERANCE = 1e-4


def train_eight_saving_at_4(directory: Path, ranks: int, *args: str) -> tuple[dict[int, float], str]:
    """8 iterations of the tiny GPT-2 without dropout on ``ranks`` ranks, saving at 4 and 8 into
    ``directory`` (resuming when it holds a checkpoint); the printed losses and the output."""
    command = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", "8", "--lr-decay-iters", "20",
               "--save-interval", "4", "--save", str(directory), "--load", str(directory), *args]
    out = run_script("pretrain_gpt2.py", command, ranks if ranks > 1 else None, timeout=600)
    return {iteration: float(value) for iteration, value in losses(out.stdout).items()}, out.stdout


def resumed_from_4(tmp_path: Path, straight: Path) -> Path:
    """A copy of ``straight`` (a ``train_eight_saving_at_4`` run) whose newest checkpoint is 4."""
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "iter_0000008")
    (resumed / "latest_checkpointed_iteration.txt").write_text("4\n")
    if (resumed / "latest").exists():
        (resumed / "latest").write_text("iter_0000004")
    return resumed


def close_after_4(expected: dict[int, float], got: dict[int, float]) -> bool:
    """Iterations 5-8 of ``got`` within ``RESUME_TOLERANCE`` (relative) of ``expected``."""
    return all(abs(got[i] - expected[i]) <= RESUME_TOLERANCE * abs(expected[i]) for i in range(5, 9))


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
