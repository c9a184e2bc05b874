"""Build a file or directory at most once across processes, atomically; rebuild it if damaged.

Every rank may call ``build_once``; one builds while the others block on an ``flock`` and then
read the finished result. The builder writes into a temporary sibling which is renamed into
place only when complete, so a killed build never leaves a half-written cache (its leftovers
are removed by the next builder, which holds the lock and so knows no one else is writing).
``load_or_build`` also reads the cache: one that cannot be read (truncated, corrupt) is not the
user's data, so it is rebuilt under the same lock, with a note, and never used.

A cache directory that cannot be created or written (read-only, or a file in the way) raises
``DataError`` naming it and the flag that moves the caches elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from megatron.data.errors import DataError

T = TypeVar("T")
# What a cache-write error tells the user to do (the demo corpus passes its own flag).
CACHE_DIR_FIX = "pass --cache-dir with a writable directory for the caches"


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable(path: Path, error: OSError, fix: str) -> DataError:
    """The DataError for a cache ``path`` that could not be created (``error``)."""
    reason = error.strerror or type(error).__name__
    blocker = _first_existing(path)
    if blocker.exists() and not blocker.is_dir() and isinstance(error, FileExistsError | NotADirectoryError):
        return DataError(f"cannot create the cache {path}: {blocker} is a file, not a directory ({reason}); {fix}")
    place = path if path.is_dir() else _first_existing(path.parent)
    return DataError(f"cannot write the cache {path}: {place} is not writable ({reason}); {fix}")


def make_cache_dir(directory: str | os.PathLike, fix: str = CACHE_DIR_FIX) -> Path:
    """Create the cache ``directory`` (and its parents) unless it exists; returns it.

    Raises DataError (saying it is not writable, and ``fix``) when it cannot be created.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(directory, error, fix) from None
    return directory


@contextmanager
def file_lock(lock_path: Path, fix: str = CACHE_DIR_FIX) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released by the OS if the process dies).

    Raises DataError (with ``fix``) if the lock file cannot be created."""
    make_cache_dir(lock_path.parent, fix)
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed below
    except OSError as error:
        raise _unwritable(lock_path, error, fix) from None
    with handle:
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


def _lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _build_locked(target: Path, build: Callable[[Path], None]) -> None:
    """Build ``target`` afresh through a temporary sibling; the caller holds the lock."""
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


def build_once(target: str | os.PathLike, build: Callable[[Path], None],
               is_complete: Callable[[Path], bool] | None = None, fix: str = CACHE_DIR_FIX) -> bool:
    """Make sure ``target`` exists, calling ``build(tmp_path)`` at most once across processes.

    ``build`` must create ``tmp_path`` (a file or a directory) completely; it is then renamed
    to ``target``. ``is_complete`` (default: ``target`` exists) decides whether a build is
    needed. Returns True when this process built it. Raises DataError (with ``fix``) when the
    directory of ``target`` cannot be written.
    """
    target = Path(target)
    complete = is_complete or (lambda path: path.exists())
    if complete(target):
        return False
    with file_lock(_lock_path(target), fix):
        if complete(target):
            return False
        _build_locked(target, build)
    return True


def _attempt_load(target: Path, load: Callable[[Path], T]) -> tuple[bool, T | None, Exception | None]:
    """(loaded, value, why not): ``why not`` is None when ``target`` is missing, else the error
    reading it raised (the cache is damaged)."""
    if not target.exists():
        return False, None, None
    try:
        return True, load(target), None
    except Exception as error:  # noqa: BLE001 - any failure to read a cache means it is damaged
        return False, None, error


def load_or_build(target: str | os.PathLike, build: Callable[[Path], None], load: Callable[[Path], T],
                  fix: str = CACHE_DIR_FIX) -> T:
    """``load(target)``, building ``target`` first (at most once across processes, as ``build_once``)
    when it is missing, or rebuilding it, with a note on stderr, when ``load`` fails on it.

    ``load`` must raise on a truncated or corrupt ``target`` (and check what it reads), so a
    damaged cache is never used. Errors of ``load`` on a fresh build propagate. Raises DataError
    (with ``fix``) when the directory of ``target`` cannot be written.
    """
    target = Path(target)
    loaded, value, _ = _attempt_load(target, load)
    if loaded:
        return value
    with file_lock(_lock_path(target), fix):
        loaded, value, damage = _attempt_load(target, load)  # another process may have rebuilt it
        if loaded:
            return value
        if damage is not None:
            reason = str(damage).split(";")[0][:200]
            print(f"note: the cache {target} is damaged ({type(damage).__name__}: {reason}); "
                  "rebuilding it", file=sys.stderr, flush=True)
        _build_locked(target, build)
        return load(target)
