"""Asynchronous checkpoints (``--async-save``): the training step waits only for the copy of the
state to host memory; writing, flushing, hashing, the completion marker and the tracker follow
in a background thread while training goes on.

A backend writes its checkpoint files at once (the synchronous save) or hands them to a
``FileSink``: ``Snapshots`` copies the state to host memory (every tensor cloned to the CPU,
everything else deep-copied, so later steps cannot change what is saved) and keeps the files
to write; ``BackgroundSaver`` then writes them and completes the
checkpoint in its thread, with its collectives on a gloo process group of its own, so they
never interleave with the training's collectives. The directory protocol is the synchronous
one: staging directory, every file flushed, the manifest, the rename, the tracker. A killed run
leaves staging, which the next start removes.

One save is in flight at a time: the next save, a stop and the end of the run wait for it; a
failed background save stops the run at that point with its one-line reason, as a failed
synchronous save stops it at once.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron import progress
from megatron.checkpoint.layout import save_torch_file


class FileSink(Protocol):
    """Where a backend's checkpoint files go."""

    def save(self, state: Any, path: str, zipfile: bool = True) -> None:
        """Write (or keep for writing) ``state`` as the ``torch.save`` file ``path``."""


def _tensors(value: Any, found: dict[int, torch.Tensor]) -> None:
    """Every tensor reachable through dicts, lists and tuples of ``value``, by id."""
    if isinstance(value, torch.Tensor):
        found[id(value)] = value
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, found)


class BufferPool:
    """Host buffers kept from one checkpoint's snapshot for the next (by dtype and shape). A fresh
    buffer costs a page fault per 4 KiB on first touch (glibc returns blocks this large to the
    kernel when they are freed): about a third of a second per GB, on the training thread."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, tuple[int, ...]], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, like: torch.Tensor) -> torch.Tensor:
        with self._lock:
            free = self._free.get((like.dtype, tuple(like.shape)))
            if free:
                return free.pop()
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                self._free.setdefault((buffer.dtype, tuple(buffer.shape)), []).append(buffer)


def snapshot(state: Any, pool: BufferPool | None = None) -> tuple[Any, list[torch.Tensor]]:
    """A copy of ``state`` in host memory that later training steps cannot change (tensors copied
    to the CPU: the device-to-host copy; everything else deep-copied), and its tensor buffers
    (taken from ``pool`` when it has them)."""
    found: dict[int, torch.Tensor] = {}
    _tensors(state, found)
    memo: dict[int, Any] = {}
    for key, tensor in found.items():
        source = tensor.detach()
        if source.layout != torch.strided:  # sparse and other layouts: a plain copy, never pooled
            memo[key] = source.to("cpu", copy=True)
            continue
        memo[key] = (pool.take(source) if pool is not None else torch.empty(source.shape, dtype=source.dtype,
                                                                             device="cpu")).copy_(source)
    buffers = [buffer for buffer in memo.values() if buffer.layout == torch.strided]  # before deepcopy adds to memo
    return copy.deepcopy(state, memo), buffers


@dataclass
class Snapshots:
    """The files of one checkpoint, copied to host memory, for ``write_all`` to write later."""

    pool: BufferPool | None = None
    files: list[tuple[str, Any, bool, list[torch.Tensor]]] = field(default_factory=list)

    def save(self, state: Any, path: str, zipfile: bool = True) -> None:
        copied, buffers = snapshot(state, self.pool)
        self.files.append((path, copied, zipfile, buffers))

    def write_all(self) -> None:
        """Write and flush every kept file, then forget it (its buffers go back to the pool)."""
        while self.files:
            path, state, zipfile, buffers = self.files.pop(0)
            save_torch_file(state, path, zipfile)
            del state
            if self.pool is not None:
                self.pool.give_back(buffers)
            progress.report()


def _yield_to_training() -> None:
    """Lower this thread's CPU priority (Linux: a thread's own nice value), so that the training
    threads win when both want a core; the checkpoint then takes the idle time between them."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class BackgroundSaver:
    """Completes one checkpoint at a time in a background thread. Every rank makes one (it
    creates the checkpoint process group, a collective) and calls ``start`` and ``wait`` at the
    same points of the run."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pool = BufferPool()  # the snapshot buffers, reused from one checkpoint to the next
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, work: Callable[[], None], name: str) -> None:
        """Run ``work`` in the background (after the previous save, which must be waited for)."""
        assert self._thread is None, "wait() for the previous checkpoint first"
        self._error = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"checkpoint-{name}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        _yield_to_training()
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = error
        finally:
            self._done.set()

    def wait(self) -> None:
        """Block until the checkpoint in flight is complete; re-raise its failure here."""
        thread = self._thread
        if thread is None:
            return
        # An Event, not Thread.join alone: a join interrupted by Ctrl-C marks the thread stopped
        # while it still runs (Python < 3.13), and the save must stay in flight (``busy``) for
        # settle_checkpoint.
        self._done.wait()
        thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
