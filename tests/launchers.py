"""The one way tests start the project's programs: real processes, one CPU thread each.

``run_script`` runs a script of the repository as plain ``python`` (``nprocs=None``) or under
``torchrun`` with ``nprocs`` ranks; ``run_training`` and ``run_tool`` are its two common uses.
Also the shared flags of a tiny GPT-2 on the demo corpus and the readers of what runs print.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from megatron.launch import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "data" / "demo"
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss (\S+) \|")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

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
TOKENIZER = ["--vocab-file", str(DEMO_DIR / "gpt2-vocab.json"), "--merge-file", str(DEMO_DIR / "gpt2-merges.txt")]
DIVISIBLE = ["--make-vocab-size-divisible-by", "40"]

__all__ = ["DEMO_DIR", "DIVISIBLE", "ENV", "NO_DROPOUT", "REPO", "TINY_GPT2", "TOKENIZER", "assert_losses_close",
           "assert_one_line_error", "command", "free_port", "kill_node", "losses", "run_script", "run_tool", "run_training",
           "start_node"]


def command(script: str, args: list[str], nprocs: int | None = None) -> list[str]:
    """``python script args``, or under ``torchrun`` with ``nprocs`` ranks on a free port."""
    if nprocs is None:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
            "--master_port", str(free_port()), script, *args]


def run_script(script: str, args: list[str], nprocs: int | None = None, timeout: int = 600, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (a path relative to the repository) and wait; ``check`` raises on failure
    with the end of its output."""
    result = subprocess.run(command(script, args, nprocs), cwd=REPO, env=env or ENV, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_training(nprocs: int, args: list[str], script: str = "pretrain_gpt2.py", timeout: int = 600,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nprocs script args``."""
    return run_script(script, args, nprocs, timeout, check)


def run_tool(script: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python script args`` in the repository."""
    return run_script(script, list(args), None, timeout, check)


def losses(output: str) -> dict[int, str]:
    """Iteration -> the printed ``lm loss`` string."""
    return {int(m.group(1)): m.group(2) for m in LOSS_RE.finditer(output)}


def assert_losses_close(actual: dict[int, str], expected: dict[int, str], rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys() and actual, (actual, expected)
    for iteration, value in expected.items():
        a, e = float(actual[iteration]), float(value)
        assert abs(a - e) <= rel * abs(e), f"iteration {iteration}: {a} vs {e} (rel tol {rel})"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, exactly one ``error:`` line holding every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def start_node(launcher: list[str], script: str, args: list[str], log: Path,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """One "node": ``launcher`` (e.g. ``torchrun --nnodes 2 --node_rank 1 ...``) running ``script
    args`` in a session of its own, its output in ``log``."""
    with open(log, "w") as handle:  # the child keeps its own descriptor
        return subprocess.Popen([*launcher, script, *args], cwd=REPO, env=env or ENV, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and its children (torchrun starts each worker in a session of its own)."""
    children = subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True, text=True).stdout.split()
    for pid in [node.pid, *map(int, children)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
