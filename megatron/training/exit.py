"""Decisions agreed by every rank: stop requests (SIGTERM or SIGINT, --exit-interval,
--exit-duration-in-mins) and time-based checkpoints (--save-interval-minutes)."""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.config import TrainingConfig


class ExitConditions:
    """Decides, identically on every rank, whether to checkpoint and stop after an iteration.

    A signal may reach only some ranks, and clocks differ: the flags are combined with a MAX
    all-reduce, so either every rank stops or none does. Costs one tiny all-reduce per iteration,
    only when --exit-signal-handler or --exit-duration-in-mins is set.
    """

    def __init__(self, training: TrainingConfig) -> None:
        self.exit_interval = training.exit_interval
        self.deadline = None if training.exit_duration_in_mins is None else \
            time.monotonic() + 60.0 * training.exit_duration_in_mins
        self.use_signal = training.exit_signal_handler
        self.received_signal = False
        self.reason = ""
        self.signal_name = ""
        if self.use_signal:
            # SIGINT (Ctrl-C, or a launcher passing it on) is a stop request like SIGTERM: save and exit.
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received_signal = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def should_exit(self, iteration: int) -> bool:
        if self.exit_interval and iteration % self.exit_interval == 0:
            self.reason = f"--exit-interval {self.exit_interval}"
            return True
        if not self.use_signal and self.deadline is None:
            return False
        flags = torch.tensor([float(self.received_signal),
                              float(self.deadline is not None and time.monotonic() > self.deadline)],
                             device=mpu.communication_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            self.reason = self.signal_name or "a signal on another rank"
        elif flags[1] > 0:
            self.reason = "--exit-duration-in-mins"
        return bool(flags.sum() > 0)


class TimedSaves:
    """``--save-interval-minutes``: whether this iteration saves because that much time passed
    since the last checkpoint (or the start). Clocks differ: rank 0's decides, through a MAX
    all-reduce of one flag per iteration, only when the flag is set."""

    def __init__(self, minutes: float | None) -> None:
        self.interval_s = None if minutes is None else 60.0 * minutes
        self.saved_at = time.monotonic()

    def due(self) -> bool:
        if self.interval_s is None:
            return False
        late = dist.get_rank() == 0 and time.monotonic() - self.saved_at > self.interval_s
        flag = torch.tensor([float(late)], device=mpu.communication_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def saved(self) -> None:
        self.saved_at = time.monotonic()
