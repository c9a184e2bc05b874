"""An ordered map over forked worker processes in which a dead worker is an error, not a hang.

``multiprocessing.Pool`` loses the task of a worker that dies (the kernel's out-of-memory killer, a
stray SIGKILL) and its ``imap`` then waits forever. Here every worker has its own task and result
pipes: the parent knows which tasks each worker owes, waits on the result pipes themselves, and a
pipe that ends before its results is a worker that died, reported with its exit status.

Results are large (a block's token ids), so the result pipes are widened to 1 MB where Linux
allows it: a worker then writes a result at once instead of 64 KB per wake-up of the parent, and
on a machine with as many workers as cores the parent wakes (and preempts a worker) far less.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron.errors import TrainingAborted

RESULT_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_DONE = None  # the task that tells a worker to exit


class WorkerDied(TrainingAborted):
    """A worker process ended before returning the results it owed."""


def _widen(connection: Connection) -> None:
    """Make ``connection``'s pipe RESULT_PIPE_BYTES long where the system allows; else keep it."""
    try:
        fcntl.fcntl(connection.fileno(), _F_SETPIPE_SZ, RESULT_PIPE_BYTES)
    except OSError:
        pass  # a lower pipe-max-size: the default pipe works, only with more wake-ups


def _serve(function: Callable[[Any], Any], tasks: Connection, results: Connection,
           inherited: list[Connection]) -> None:
    """A worker's loop: ``(number, ok, value)`` for each ``(number, task)`` until _DONE; an
    exception raised by ``function`` goes back as the value. ``inherited`` (the parent's ends of
    the pipes, this worker's and the earlier workers') are closed first, so that each pipe ends when
    the process at its other end does: a worker whose parent dies finds its task pipe ended.
    SIGINT is left to the parent, which stops the workers itself (a Ctrl-C reaches the whole
    process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for connection in inherited:
        connection.close()
    while True:
        try:
            message = tasks.recv()
        except EOFError:  # the parent is gone
            return
        if message is _DONE:
            return
        number, task = message
        try:
            outcome = (number, True, function(task))
        except Exception as error:  # noqa: BLE001 - re-raised in the parent
            outcome = (number, False, error)
        try:
            results.send(outcome)
        except BrokenPipeError:  # the parent stopped reading: it is shutting the pool down
            return
        except Exception as error:  # noqa: BLE001 - a value pickle refuses: say so instead
            try:
                results.send((number, False, RuntimeError(f"{type(error).__name__}: {error}")))
            except BrokenPipeError:
                return


def _death(process: multiprocessing.process.BaseProcess) -> str:
    """How ``process`` ended, for the error line."""
    process.join(timeout=5)
    code = process.exitcode
    if code is None:
        return "closed its result pipe"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's out-of-memory killer sends it: lower --workers or free memory)" \
            if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def ordered_map(function: Callable[[Any], Any], tasks: Iterable[Any], workers: int,
                depth: int = 2, what: str = "worker") -> Iterator[Any]:
    """``function(task)`` for each of ``tasks``, in order, computed by ``workers`` forked processes
    (``function`` and what it refers to are inherited, not pickled; tasks and results are).

    Each worker holds at most ``depth`` tasks, so it never waits for the parent to hand it the
    next one, and at most ``workers * depth`` results wait in the parent to be put in order. An
    exception raised by ``function`` is raised here in its task's turn; a worker that dies raises
    WorkerDied at once, naming it (``what``) and how it ended. Closing the iterator stops the
    workers."""
    if workers < 1 or depth < 1:
        raise ValueError(f"workers and depth must be positive, got {workers} and {depth}")
    context = multiprocessing.get_context("fork")
    processes: list[multiprocessing.process.BaseProcess] = []
    senders: list[Connection] = []
    receivers: dict[Connection, int] = {}
    try:
        for index in range(workers):
            task_reader, task_writer = context.Pipe(duplex=False)
            result_reader, result_writer = context.Pipe(duplex=False)
            _widen(result_writer)
            process = context.Process(target=_serve, args=(function, task_reader, result_writer,
                                      [*senders, *receivers, task_writer, result_reader]),
                                      daemon=True, name=f"{what}-{index}")
            process.start()
            task_reader.close()  # the worker's ends: its result pipe then ends when it dies
            result_writer.close()
            processes.append(process)
            senders.append(task_writer)
            receivers[result_reader] = index
        yield from _run(tasks, depth, processes, senders, receivers, what)
        for sender in senders:
            try:
                sender.send(_DONE)
            except BrokenPipeError:  # a worker gone after its last result: nothing is lost
                pass
        for process in processes:
            process.join(timeout=5)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        for connection in [*senders, *receivers]:
            connection.close()


def _run(tasks: Iterable[Any], depth: int, processes: list, senders: list[Connection],
         receivers: dict[Connection, int], what: str) -> Iterator[Any]:
    """Hand out tasks, gather results, yield them in task order (see ordered_map)."""
    pending = iter(enumerate(tasks))
    owed: list[int] = [0] * len(processes)  # tasks each worker holds

    def died(index: int) -> WorkerDied:
        return WorkerDied(f"{what} process {processes[index].pid} {_death(processes[index])} "
                          "before returning its work")

    def hand_out(index: int) -> None:
        message = next(pending, None)
        if message is not None:
            try:
                senders[index].send(message)
            except BrokenPipeError:
                raise died(index) from None
            owed[index] += 1

    for _ in range(depth):
        for index in range(len(processes)):
            hand_out(index)
    done: dict[int, tuple[bool, Any]] = {}  # by task number: (ok, result or exception)
    following = 0  # the number of the next result to yield
    while any(owed):
        for connection in wait([c for c, i in receivers.items() if owed[i]]):
            index = receivers[connection]
            try:
                number, ok, value = connection.recv()
            except (EOFError, OSError):  # OSError: the pipe ended inside a message (killed mid-send)
                raise died(index) from None
            owed[index] -= 1
            done[number] = ok, value
            hand_out(index)
        while following in done:
            ok, value = done.pop(following)
            if not ok:
                raise value
            yield value
            following += 1
