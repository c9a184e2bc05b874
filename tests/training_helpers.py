"""Run the real training entry point in real processes (torchrun or the deepspeed launcher)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "data" / "demo"
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss (\S+) \|")

TINY_GPT2 = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--lr", "1e-3", "--lr-decay-iters", "20", "--warmup", "0.1", "--log-interval", "1",
    "--eval-interval", "1000", "--eval-iters", "1", "--num-workers", "0",
    "--train-data", "demo", "--vocab-file", str(DEMO_DIR / "gpt2-vocab.json"),
    "--merge-file", str(DEMO_DIR / "gpt2-merges.txt"), "--demo-data-dir", str(DEMO_DIR),
    # The demo vocabulary (8000) then pads to 8000 at model-parallel sizes 1, 2 and 4 alike, so
    # initialisation (drawn for the padded table) is the same at every size.
    "--make-vocab-size-divisible-by", "40",
]
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(nprocs: int, args: list[str], script: str = "pretrain_gpt2.py", timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nprocs script args``; one CPU thread per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
               "--master_port", str(free_port()), script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def losses(output: str) -> dict[int, str]:
    """Iteration -> the printed ``lm loss`` string."""
    return {int(m.group(1)): m.group(2) for m in LOSS_RE.finditer(output)}


def assert_losses_close(actual: dict[int, str], expected: dict[int, str], rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys() and actual, (actual, expected)
    for iteration, value in expected.items():
        a, e = float(actual[iteration]), float(value)
        assert abs(a - e) <= rel * abs(e), f"iteration {iteration}: {a} vs {e} (rel tol {rel})"
