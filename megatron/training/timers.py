"""Named wall-clock timers, and a memory report."""

from __future__ import annotations

import time

import torch


class Timer:
    def __init__(self, name: str, synchronize: bool) -> None:
        self.name = name
        self.synchronize = synchronize
        self.elapsed_ = 0.0
        self.started_ = False
        self.start_time = 0.0

    def _sync(self) -> None:
        if self.synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.start_time = time.perf_counter()
        self.started_ = True

    def stop(self) -> None:
        if not self.started_:
            return
        self._sync()
        self.elapsed_ += time.perf_counter() - self.start_time
        self.started_ = False

    def reset(self) -> None:
        self.elapsed_ = 0.0
        self.started_ = False

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated (including a running interval); optionally reset."""
        running = self.started_
        if running:
            self.stop()
        value = self.elapsed_
        if reset:
            self.reset()
        if running:
            self.start()
        return value


class Timers:
    """``timers('forward').start()``; phase timers synchronise the device only when asked."""

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self.timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        if name not in self.timers:
            self.timers[name] = Timer(name, self.synchronize)
        return self.timers[name]

    def log_string(self, names: list[str], normalizer: float = 1.0) -> str:
        parts = [f"{name}: {self.timers[name].elapsed() * 1000.0 / normalizer:.2f}"
                 for name in names if name in self.timers]
        return "time (ms) | " + " | ".join(parts)


def memory_report(name: str) -> str:
    """Allocated/peak device memory on CUDA; resident set size on CPU."""
    if torch.cuda.is_available():
        mib = 1024 * 1024
        return (f"[{name}] memory (MB) | allocated: {torch.cuda.memory_allocated() / mib:.1f} | "
                f"max allocated: {torch.cuda.max_memory_allocated() / mib:.1f} | "
                f"reserved: {torch.cuda.memory_reserved() / mib:.1f}")
    import psutil

    rss = psutil.Process().memory_info().rss / (1024 * 1024)
    return f"[{name}] memory (MB) | resident: {rss:.1f}"
