from __future__ import annotations

import sys
import time
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


def _mapped_files() -> set[str]:
    """Paths of the files some process on this machine has mapped (Linux /proc)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(None, 5)[5].strip() for line in maps.read_text().splitlines()
                          if line.count(" ") >= 5 and "/dev/shm/" in line)
        except (OSError, IndexError):
            continue  # the process ended, or is not ours to read
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shared_memory_left_by_killed_ranks():
    """DeepSpeed's CPU all-reduce keeps a 66 MB buffer per rank in /dev/shm and removes it only at
    a clean exit; the tests SIGKILL ranks on purpose. Remove the buffers that appeared during this
    session and that no process still maps (never another job's live buffer), so a CI machine's
    memory does not fill up run after run. A buffer written in the last minute is left alone: a
    starting rank writes its file before it maps it."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    in_use = _mapped_files()
    for leftover in (set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()) - before:
        try:
            if str(leftover) not in in_use and time.time() - leftover.stat().st_mtime > 60:
                leftover.unlink()
        except OSError:  # gone already, or not ours to remove
            pass
