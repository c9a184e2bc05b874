"""Build a file or directory at most once across processes, atomically.

Every rank may call ``build_once``; one builds while the others block on an ``flock`` and then
read the finished result. The builder writes into a temporary sibling which is renamed into
place only when complete, so a killed build never leaves a half-written cache (its leftovers
are removed by the next builder, which holds the lock and so knows no one else is writing).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released by the OS if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp"


def build_once(target: str | os.PathLike, build: Callable[[Path], None],
               is_complete: Callable[[Path], bool] | None = None) -> bool:
    """Make sure ``target`` exists, calling ``build(tmp_path)`` at most once across processes.

    ``build`` must create ``tmp_path`` (a file or a directory) completely; it is then renamed
    to ``target``. ``is_complete`` (default: ``target`` exists) decides whether a build is
    needed. Returns True when this process built it.
    """
    target = Path(target)
    complete = is_complete or (lambda path: path.exists())
    if complete(target):
        return False
    with file_lock(target.with_name(target.name + ".lock")):
        if complete(target):
            return False
        for stale in target.parent.glob(_temp_prefix(target) + "*"):
            _remove(stale)
        tmp = target.with_name(f"{_temp_prefix(target)}{os.getpid()}")
        try:
            build(tmp)
            _remove(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                _remove(tmp)
    return True
