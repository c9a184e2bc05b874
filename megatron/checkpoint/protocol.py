"""Saving and loading a training run's checkpoint: the directory protocol and the state both
paths add (progress, RNG, model description). Every rank calls ``save_checkpoint`` and
``load_checkpoint``; the backend writes and reads its own files.

A checkpoint is written under ``iter_0000100.tmp``, renamed once every rank has flushed its
files, then marked complete; only then does the tracker file name it. A directory without its
marker is never loaded.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.checkpoint.layout import (
    CHECKPOINT_VERSION,
    COMPLETE_MARKER,
    TRACKER_FILENAME,
    check_model_config,
    checkpoint_tag,
    complete_iterations,
    fsync_tree,
    latest_iteration,
    saved_model_parallel_size,
    write_text_atomic,
)
from megatron.checkpoint.rng import get_rng_states
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted

if TYPE_CHECKING:
    from megatron.backends.base import Backend


def run_model_config(run: RunConfig) -> dict[str, int]:
    """What a checkpoint's tensors depend on; a mismatch at load time is a user error."""
    return {**run.model.shape(), "model_parallel_size": run.parallel.model_parallel_size,
            "pipe_parallel_size": run.parallel.pipe_parallel_size}


def client_state(run: RunConfig, backend: Backend, iteration: int, consumed_samples: int) -> dict[str, Any]:
    """The state both paths add to a checkpoint: progress, RNG, model shape."""
    state: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "model_config": run_model_config(run),
    }
    if run.checkpoint.save_rng:
        state["rng_states"] = get_rng_states(backend.rng_tracker)
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_weights_finite(backend: Backend, iteration: int) -> None:
    """Refuse to save NaN/Inf weights (agreed across ranks): good checkpoints stay the newest."""
    bad = torch.zeros(1, device=mpu.communication_device())
    for param in backend.parameters():
        if param.numel() and not bool(torch.isfinite(param.detach()).all()):
            bad.fill_(1.0)
            break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        raise TrainingAborted(f"weights are not finite at iteration {iteration}: checkpoint not written; "
                              "resume from the last complete checkpoint with a lower --lr")


def remove_stale_staging(save: str) -> None:
    """Rank 0 deletes ``iter_*.tmp`` directories left by a killed save."""
    for name in os.listdir(save) if os.path.isdir(save) else []:
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)


def apply_retention(save: str, keep_last_n: int | None) -> None:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (never the newest)."""
    if not keep_last_n:
        return
    complete = complete_iterations(save)
    for iteration in complete[: max(len(complete) - keep_last_n, 0)]:
        shutil.rmtree(os.path.join(save, checkpoint_tag(iteration)), ignore_errors=True)


def save_checkpoint(run: RunConfig, backend: Backend, iteration: int, consumed_samples: int) -> str:
    """Write checkpoint ``iteration`` under ``--save``; every rank calls it. Returns its directory."""
    save = run.checkpoint.save
    check_weights_finite(backend, iteration)
    tag = checkpoint_tag(iteration)
    staging_tag, final_dir = tag + ".tmp", os.path.join(save, tag)
    staging_dir = os.path.join(save, staging_tag)
    if dist.get_rank() == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)
        os.makedirs(staging_dir)
    _barrier()
    backend.save_state(save, staging_tag, client_state(run, backend, iteration, consumed_samples))
    if os.path.isdir(staging_dir):
        fsync_tree(staging_dir)
    _barrier()
    if dist.get_rank() == 0:
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(staging_dir, final_dir)
        write_text_atomic(os.path.join(final_dir, COMPLETE_MARKER), f"{iteration}\n")
        write_text_atomic(os.path.join(save, TRACKER_FILENAME), f"{iteration}\n")
        if backend.writes_deepspeed_latest:
            write_text_atomic(os.path.join(save, "latest"), tag)
        apply_retention(save, run.checkpoint.keep_last_n)
    _barrier()
    return final_dir


def check_model_parallel_size(directory: str, run: RunConfig) -> None:
    saved = saved_model_parallel_size(directory)
    if run.parallel.pipe_parallel_size > 1:
        return  # DeepSpeed numbers pipeline x tensor ranks together; model_config is checked instead
    if saved and saved != run.parallel.model_parallel_size:
        raise ConfigError(f"checkpoint {directory} was saved with model_parallel_size {saved}, this run uses "
                          f"--model-parallel-size {run.parallel.model_parallel_size}; reshard it with "
                          "tools/convert_checkpoint.py reshard, or launch with the saved size")


def load_checkpoint(run: RunConfig, backend: Backend) -> tuple[int, int, dict[str, Any] | None]:
    """Load the newest complete checkpoint under ``--load``.

    Returns (iteration, consumed_samples, RNG states). The caller restores the RNG states with
    ``megatron.checkpoint.rng.set_rng_states`` just before the first step, after everything that
    may still draw from the generators during start-up. Returns (0, 0, None) and says so when
    there is nothing to load.
    """
    load = run.checkpoint.load
    if dist.get_rank() == 0 and load:
        remove_stale_staging(load)
    _barrier()
    iteration = latest_iteration(load) if load else None
    if iteration is None:
        if dist.get_rank() == 0:
            print(f" no complete checkpoint under {load}: starting from scratch", flush=True)
        return 0, 0, None
    tag = checkpoint_tag(iteration)
    directory = os.path.join(load, tag)
    check_model_parallel_size(directory, run)
    expected = run_model_config(run)
    state = backend.load_state(
        load, tag, load_optimizer=run.checkpoint.load_optim and not run.checkpoint.finetune,
        validate=lambda saved: check_model_config(saved.get("model_config", {}), expected, directory))
    if run.checkpoint.finetune:
        return 0, 0, None
    rng_states = state.get("rng_states") if run.checkpoint.load_rng else None
    if dist.get_rank() == 0:
        print(f" loaded checkpoint {directory} at iteration {state['iteration']}", flush=True)
    return int(state["iteration"]), int(state.get("consumed_samples", 0)), rng_states
