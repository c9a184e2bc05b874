"""Hang to restart: a rank whose training loop stops making progress ends the job.

A hung rank (SIGSTOP, a stuck file system, a dead GPU) leaves the others waiting in their next
collective; gloo and NCCL do not always time out there. Each rank runs this watchdog: once the
first step is done, the loop reports progress after every step and every evaluation batch, and a
checkpoint counts as progress while its files grow and while they are flushed and hashed (each
file flushed and each chunk hashed is reported through ``megatron.progress``); a rank that has not
progressed for ``--progress-timeout-minutes`` prints one line and exits with
status 1, so that ``torchrun --max-restarts`` restarts the job (which resumes from the newest
checkpoint) or, without restarts left, the job ends non-zero instead of holding its nodes. The
hung rank cannot run its own watchdog; the others' fire, and the launcher stops it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from megatron import progress
from megatron.training.entry import error_line


class ProgressWatchdog:
    """``beat()`` after each unit of progress; ``stop()`` when training ends. Disabled at 0."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._last = time.monotonic()
        self._armed = False
        self._stopped = threading.Event()
        self._writing: str | None = None  # a --save directory whose staging is being written
        self._written: tuple[int, int, int] | None = None

    def start(self) -> None:
        if self.timeout_s > 0:
            progress.listen(self.beat)
            threading.Thread(target=self._watch, name="progress-watch", daemon=True).start()

    def beat(self) -> None:
        """Progress made (the first beat arms it: start-up and the first step may compile)."""
        self._last = time.monotonic()
        self._armed = True

    def stop(self) -> None:
        progress.listen(None)
        self._stopped.set()

    @contextmanager
    def writing(self, save: str) -> Iterator[None]:
        """A checkpoint is being written under ``save``: while its staging files (``*.tmp``) grow
        it is progress; a save that writes nothing for the timeout (a stuck file system) is not."""
        self.beat()
        self._written, self._writing = None, save
        try:
            yield
        finally:
            self._writing = None
            self.beat()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 10)):
            writing = self._writing
            if writing is not None:
                written = staging_signature(writing)
                if written != self._written:
                    self._written = written
                    self._last = time.monotonic()
            idle = time.monotonic() - self._last
            if self._armed and idle > self.timeout_s:
                self._exit(idle)

    def _exit(self, idle: float) -> None:
        error_line(f"error (rank {self.rank})", f"no training progress for {idle:.0f} s (--progress-timeout-minutes "
                   f"{self.timeout_s / 60:g}): a rank hung or a collective is stuck; exiting so that the launcher "
                   "restarts the job from the newest checkpoint")
        os._exit(1)


def staging_signature(save: str) -> tuple[int, int, int]:
    """(files, bytes, newest modification) of the staging directories (``*.tmp``) under ``save``."""
    files = size = newest = 0
    try:
        entries = [entry.path for entry in os.scandir(save) if entry.name.endswith(".tmp") and entry.is_dir()]
    except OSError:
        return 0, 0, 0
    for top in entries:
        for dirpath, _, names in os.walk(top):
            for name in names:
                try:
                    info = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                files, size, newest = files + 1, size + info.st_size, max(newest, info.st_mtime_ns)
    return files, size, newest
