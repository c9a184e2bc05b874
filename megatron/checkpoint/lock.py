"""One writer per checkpoint directory: an exclusive ``flock`` on ``<dir>/.writer.lock``.

A training run holds it on ``--save`` for its whole life (rank 0 takes it at start-up); the
offline tools take it while they write. The lock belongs to the process: it is released when the
process ends, however it ends, so a lock "left" by a dead process is simply free; the file's
content (host, pid, start time, command) then names the previous holder, and the new holder
says that it took over. A second writer is refused with the holder's name.

``flock`` is advisory and local to the kernel that grants it: on NFS v4 (and v3 with lockd) it
works across hosts; on file systems without locking it does not protect against another host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass

from megatron.errors import ConfigError, TrainingAborted

LOCK_FILENAME = ".writer.lock"


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"

    def is_dead_here(self) -> bool:
        """The holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _read_holder(fd: int) -> LockHolder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8"))
        return LockHolder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _write_holder(fd: int) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    os.fsync(fd)


class DirectoryLock:
    """The writer's lock on ``directory`` (created if missing)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILENAME)
        self.fd: int | None = None

    def acquire(self, flag: str = "--save") -> str | None:
        """Take the lock or raise ConfigError naming the holder; returns a note when it takes over
        from a holder that died on this host."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise self._unusable(flag, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ConfigError(f"{flag} {self.directory}: the file system refuses a lock ({error.strerror}); "
                                  "use a directory on a file system with locking") from None
            who = holder.describe() if holder else "another process"
            raise ConfigError(f"{flag} {self.directory} is being written by another run ({who}); wait for it to "
                              "finish or stop it, or pick another directory") from None
        previous = _read_holder(fd)
        try:
            _write_holder(fd)
        except OSError as error:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._unusable(flag, error) from None
        self.fd = fd
        if previous is not None and previous.is_dead_here():
            return f"took over the writer lock of {self.directory} from {previous.describe()} (no longer running)"
        return None

    def _unusable(self, flag: str, error: OSError) -> Exception:
        """The one-line error for a lock file that cannot be created or written: a full disk is
        not the user's mistake (TrainingAborted, exit 1), the rest is (ConfigError)."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(self.directory).free / 2**20 if os.path.isdir(self.directory) else 0.0
            return TrainingAborted(f"{flag} {self.directory}: its writer lock {self.path} cannot be written "
                                   f"({error.strerror}, {free:.0f} MB free there): free space and relaunch")
        if os.path.isdir(self.path):
            return ConfigError(f"{flag} {self.directory}: its writer lock {self.path} is a directory; remove it "
                               "(it holds no checkpoint) and relaunch")
        return ConfigError(f"{flag} {self.directory}: its writer lock {self.path} cannot be created ({error.strerror}); "
                           "pick a directory you can write to")

    def release(self) -> None:
        """Clear the holder (a file left with one means its writer died) and unlock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
