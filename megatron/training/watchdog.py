"""Hang to restart: a rank whose training loop stops making progress ends the job.

A hung rank (SIGSTOP, a stuck file system, a dead GPU) leaves the others waiting in their next
collective; gloo and NCCL do not always time out there. Each rank runs this watchdog: once the
first step is done, the loop reports progress after every step, checkpoint and evaluation, and a
rank that has not reported for ``--progress-timeout-minutes`` prints one line and exits with
status 1, so that ``torchrun --max-restarts`` restarts the job (which resumes from the newest
checkpoint) or, without restarts left, the job ends non-zero instead of holding its nodes. The
hung rank cannot run its own watchdog; the others' fire, and the launcher stops it.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class ProgressWatchdog:
    """``beat()`` after each unit of progress; ``stop()`` when training ends. Disabled at 0."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._last = time.monotonic()
        self._armed = False
        self._stopped = threading.Event()

    def start(self) -> None:
        if self.timeout_s > 0:
            threading.Thread(target=self._watch, name="progress-watch", daemon=True).start()

    def beat(self) -> None:
        """Progress made (the first beat arms it: start-up and the first step may compile)."""
        self._last = time.monotonic()
        self._armed = True

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self._last
            if self._armed and idle > self.timeout_s:
                self._exit(idle)

    def _exit(self, idle: float) -> None:
        print(f"error (rank {self.rank}): no training progress for {idle:.0f} s (--progress-timeout-minutes "
              f"{self.timeout_s / 60:g}): a rank hung or a collective is stuck; exiting so that the launcher "
              "restarts the job from the newest checkpoint", file=sys.stderr, flush=True)
        os._exit(1)
