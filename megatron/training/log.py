"""What a training run tells: rank 0's printed lines, TensorBoard scalars and the experiment record."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from typing import Any

import torch.distributed as dist

from megatron.config import RunConfig


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _git(*command: str) -> str:
    try:
        out = subprocess.run(["git", *command], capture_output=True, text=True, timeout=30,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def hparams(run: RunConfig) -> dict[str, Any]:
    """Megatron's flat record of a run: every flag as given, then the values derived from them."""
    derived = {
        "rank": run.parallel.rank, "world_size": run.parallel.world_size, "local_rank": run.parallel.local_rank,
        "data_parallel_size": run.parallel.data_parallel_size, "device": str(run.device),
        "distributed_backend": run.parallel.distributed_backend, "vocab_size": run.model.vocab_size,
        "padded_vocab_size": run.model.padded_vocab_size, "eod_token": run.eod_token,
        "params_dtype": run.precision.dtype, "gradient_accumulation_steps": run.training.gradient_accumulation_steps,
        "lr_decay_iters": run.optimizer.lr_decay_iters, "eval_batch_size": run.training.eval_batch_size,
    }
    return {**json.loads(run.flags_json), **derived}


def new_experiment_dir() -> str:
    """``experiments/gpt2-<timestamp>``, made here; a run started in the same second as another
    gets ``-2``, ``-3``...: a run never writes into another's record."""
    base = os.path.join("experiments", time.strftime("gpt2-%Y%m%d-%H%M%S"))
    os.makedirs("experiments", exist_ok=True)
    for number in range(1, 10_000):
        candidate = base if number == 1 else f"{base}-{number}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: too many experiment directories started this second")


def record_experiment(run: RunConfig) -> str | None:
    """Rank 0 writes hparams.json (flags and derived values, flat), run_config.json (the RunConfig's
    sections), githash.log and gitdiff.log into ``--exp-dir`` (default
    ``experiments/gpt2-<timestamp>``) and returns that directory; other ranks return None."""
    if dist.get_rank() != 0:
        return None
    exp_dir = run.logging.exp_dir or new_experiment_dir()
    os.makedirs(exp_dir, exist_ok=True)
    with open(os.path.join(exp_dir, "hparams.json"), "w") as handle:
        json.dump(hparams(run), handle, indent=2, sort_keys=True, default=str)
    sections = {field.name: dataclasses.asdict(getattr(run, field.name)) for field in dataclasses.fields(run)
                if dataclasses.is_dataclass(getattr(run, field.name))}
    with open(os.path.join(exp_dir, "run_config.json"), "w") as handle:
        json.dump({**sections, "eod_token": run.eod_token}, handle, indent=2, default=str)
    with open(os.path.join(exp_dir, "githash.log"), "w") as handle:
        handle.write(_git("rev-parse", "HEAD"))
    with open(os.path.join(exp_dir, "gitdiff.log"), "w") as handle:
        handle.write(_git("diff", "HEAD"))
    return exp_dir


@dataclasses.dataclass(frozen=True)
class IntervalReport:
    """What one log line reports, averaged over the iterations since the previous one."""

    iteration: int
    ms_per_iteration: float
    learning_rate: float
    loss: float
    loss_scale: float
    grad_norm: float | None
    skipped: int
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None


def log_line(report: IntervalReport, train_iters: int) -> str:
    """Megatron's iteration line, plus gradient norm, tokens/s, TFLOP/s and MFU."""
    grad_norm = "n/a" if report.grad_norm is None else f"{report.grad_norm:.3E}"
    return (f" iteration {report.iteration:8d}/{train_iters:8d} |"
            f" elapsed time per iteration (ms): {report.ms_per_iteration:.1f} |"
            f" learning rate {report.learning_rate:.3E} |"
            f" lm loss {report.loss:.6E} |"
            f" loss scale {report.loss_scale:.1f} |"
            f" grad norm {grad_norm} |"
            f" number of skipped iterations {report.skipped:3d} |"
            f" tokens/s {report.tokens_per_s:.1f} |"
            f" TFLOP/s per device {report.tflops_per_device:.3f} |"
            f" MFU {'n/a' if report.mfu is None else f'{report.mfu:.2%}'} |")


def write_scalars(writer: Any, report: IntervalReport) -> None:
    if writer is None:
        return
    step = report.iteration
    writer.add_scalar("lm loss", report.loss, step)
    writer.add_scalar("learning rate", report.learning_rate, step)
    writer.add_scalar("loss scale", report.loss_scale, step)
    if report.grad_norm is not None:
        writer.add_scalar("grad norm", report.grad_norm, step)
    writer.add_scalar("tokens per second", report.tokens_per_s, step)
    writer.add_scalar("TFLOP/s per device", report.tflops_per_device, step)
    writer.flush()
