"""megatron/data/worker_pool.ordered_map: results in task order from real forked workers; a worker's
exception raised in the parent; a killed worker an error naming it, not a hang (multiprocessing.Pool
waits forever); no worker outlives its parent, whether the parent stops early or is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron.data.worker_pool import WorkerDied, ordered_map

REPO = Path(__file__).resolve().parents[3]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def _uneven(task: int) -> tuple[int, int]:
    time.sleep(0.02 * (task % 3 == 0))  # some tasks slower: results arrive out of order
    return task, os.getpid()


@pytest.mark.parametrize("workers,depth", [(1, 1), (2, 2), (3, 1), (4, 3)])
def test_results_come_in_task_order(workers: int, depth: int) -> None:
    results = list(ordered_map(_uneven, range(40), workers, depth=depth))
    assert [task for task, _ in results] == list(range(40))
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids and len(pids) == workers
    assert _wait_gone(list(pids)) == []


def test_no_tasks_and_bad_sizes() -> None:
    assert list(ordered_map(_uneven, [], 2)) == []
    with pytest.raises(ValueError, match="workers and depth must be positive"):
        list(ordered_map(_uneven, range(3), 0))


def _fails_on_five(task: int) -> int:
    if task == 5:
        raise LookupError(f"task {task} is bad")
    return task


def test_a_workers_exception_is_raised_in_the_parent_and_stops_the_workers() -> None:
    seen = []
    with pytest.raises(LookupError, match="task 5 is bad"):
        for value in ordered_map(_fails_on_five, range(100), 2):
            seen.append(value)
    assert seen == [0, 1, 2, 3, 4]


def _dies_on_three(task: int) -> tuple[int, int]:
    if task == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    return task, os.getpid()


def test_a_killed_worker_is_an_error_naming_it_not_a_hang() -> None:
    seen = []
    with pytest.raises(WorkerDied, match=r"worker process \d+ was killed by SIGKILL \(the kernel's "
                                         r"out-of-memory killer"):
        for task, pid in ordered_map(_dies_on_three, range(20), 2):
            seen.append(pid)
    assert len(seen) <= 3 and _wait_gone(seen) == []


def _exits(task: int) -> int:
    if task == 1:
        os._exit(7)
    return task


def test_a_worker_that_exits_is_named_with_its_status() -> None:
    with pytest.raises(WorkerDied, match="exited with status 7"):
        list(ordered_map(_exits, range(6), 2))


def test_closing_early_stops_the_workers() -> None:
    results = ordered_map(_uneven, range(1000), 2)
    pids = [pid for _, pid in (next(results), next(results))]
    results.close()
    assert _wait_gone(pids, seconds=2) == []


def _unpicklable(task: int) -> object:
    return lambda: task  # a result pickle refuses


def test_a_result_that_cannot_be_sent_is_an_error_not_a_dead_worker() -> None:
    with pytest.raises(RuntimeError, match="(?i)pickl"):
        list(ordered_map(_unpicklable, range(3), 2))


def test_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the parent (a killed launcher, the OOM killer): its workers find their task or
    result pipes ended and exit, however many there are (each closes the others' pipe ends)."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from megatron.data.worker_pool import ordered_map
        def slow(task):
            time.sleep(0.05)
            return os.getpid()
        seen = set()
        for pid in ordered_map(slow, range(100000), 3):
            if pid not in seen:
                seen.add(pid)
                print(pid, flush=True)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(parent.stdout.readline()) for _ in range(3)]
    parent.kill()
    parent.wait()
    assert _wait_gone(workers) == []


def _dies_mid_message(task: int) -> int:
    """Write the start of a result (a length header promising 100,000 bytes, then 7 of them) to
    this worker's result pipe and die: what a worker killed while sending a large result leaves."""
    import gc
    import struct
    from multiprocessing.connection import Connection

    if task == 2:
        pipe = next(obj for obj in gc.get_objects() if isinstance(obj, Connection) and not obj.closed
                    and obj.writable)
        os.write(pipe.fileno(), struct.pack("!i", 100_000) + b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return task


def test_a_worker_killed_inside_a_message_is_an_error_naming_it() -> None:
    """Hostile review: a result cut off mid-message raised OSError ("got end of file during
    message") with a traceback instead of WorkerDied."""
    with pytest.raises(WorkerDied, match="was killed by SIGKILL"):
        list(ordered_map(_dies_mid_message, range(6), 2))
