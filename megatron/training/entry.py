"""How an entry point ends: the error policy and the process exit.

Only ``ConfigError`` (and its subclasses: data, tokenizer, checkpoint mismatches) is a user
error: one ``error:`` line on stderr and exit status 2, nothing written. ``TrainingAborted`` (a
run stopped on purpose) is one line and status 1, as is a failed collective (another rank most
likely died). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import torch.distributed as dist

from megatron.errors import ConfigError, TrainingAborted

# What a collective that lost its peer says. Only transport failures: a message that merely
# mentions a backend (e.g. "nccl needs CUDA") is not one, and keeps its own report.
COLLECTIVE_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                              "timed out", "Timed out", "NCCL error", "ProcessGroupNCCL", "gloo/transport")


def _is_collective_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistBackendError) or any(marker in text for marker in COLLECTIVE_FAILURE_MARKERS)


def filter_known_warnings() -> None:
    """Known-harmless third-party noise, filtered at its source (nothing blanket-silenced):

    * DeepSpeed warns "Setting accelerator to CPU" once per process (5 times in the demo job)
      when it finds no GPU: on a machine without CUDA it is told so with ``DS_ACCELERATOR=cpu``
      (before anything imports it; a value already set is kept).
    * torch 2.13 deprecates ``all_gather_into_tensor``, which DeepSpeed's ZeRO calls on every
      rank: that one ``FutureWarning``, by its message.
    """
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def _let_rank_0_report_first(rank: str, seconds: float = 2.0) -> None:
    """The launcher stops every worker once one exits: a rank other than 0 that met the same error
    waits a moment, so that rank 0's line (the one without a rank) is printed too, not cut off.
    Ctrl-C ends the wait, not the report."""
    if rank != "0":
        try:
            time.sleep(seconds)
        except KeyboardInterrupt:
            pass


def error_line(prefix: str, message: str) -> None:
    """One write per line: under ``python -u`` (DeepSpeed's launcher) ``print`` writes the text
    and the newline apart, and two ranks failing at once glued their lines together."""
    sys.stderr.write(f"{prefix}: {message}\n")
    sys.stderr.flush()


def run_entry_point(run: Callable[[], None]) -> int:
    """Run an entry point's body; user errors and aborts become one line on stderr.

    Exit status: 0 done, 2 bad input (nothing was written), 1 training aborted or a collective
    failed (most likely another rank died: its log has the cause), 130 interrupted by SIGINT.
    """
    rank = os.environ.get("RANK", "0")
    prefix = "error" if rank == "0" else f"error (rank {rank})"
    filter_known_warnings()
    status, message = 0, None
    try:
        try:
            run()
        except ConfigError as error:
            status, message = 2, str(error)
        except TrainingAborted as error:
            status, message = 1, str(error)
        except KeyboardInterrupt:
            status, message = 130, ("interrupted (SIGINT): stopped without writing anything more; what was already "
                                    "saved is intact (training: pass --exit-signal-handler to save a checkpoint on "
                                    "SIGINT/SIGTERM)")
        except Exception as error:  # noqa: BLE001 - collective failures become one line, the rest re-raised
            if not _is_collective_failure(error):
                raise
            status, message = 1, (f"a collective operation failed ({type(error).__name__}: {str(error)[:200]}); "
                                  "another rank most likely died or hung: check the other ranks' logs")
        if message is not None:  # reported outside the handlers: nothing chains onto the error
            error_line(prefix, message)
            if status in (1, 2):
                _let_rank_0_report_first(rank)
        return status
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be broken after a failure
                pass


def remove_deepspeed_cpu_buffer() -> None:
    """DeepSpeed's CPU all-reduce (every rank on one machine) maps a 66 MB file per rank in
    /dev/shm, ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<RANK>``, and never
    removes it: each demo run left 132 MB of memory behind. After a clean exit every rank is done
    with the others' buffers (opened at start-up), so each removes its own; a mapping still open
    elsewhere stays valid."""
    env = os.environ
    if not all(key in env for key in ("MASTER_ADDR", "MASTER_PORT", "RANK")):
        return
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:  # none made (not DeepSpeed, ranks on several machines), or gone already
        pass


def exit_process(exit_code: int) -> None:
    """Leave without running C++ static destructors: with gloo and DeepSpeed's CPU communication
    threads still alive they occasionally abort (SIGABRT) a run that finished correctly.
    Checkpoints are already fsynced and the process group destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code == 0:
        remove_deepspeed_cpu_buffer()
    os._exit(exit_code)
