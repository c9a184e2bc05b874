"""Checkpoints in Megatron's layout, for the Megatron and the DeepSpeed path alike.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/complete                              (written last)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt         (Megatron path)
    <save>/iter_0000100/mp_rank_00_model_states.pt, zero_*    (DeepSpeed path)

A checkpoint is written under ``iter_0000100.tmp``, renamed once every rank has flushed its
files, then marked complete; only then does the tracker file name it. A directory without its
marker is never loaded. The backend (``megatron.backends``) writes and reads its own files;
this module owns the directory protocol and the state common to both paths.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.errors import ConfigError, TrainingAborted
from megatron.rng import get_rng_states

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "complete"
CHECKPOINT_VERSION = 1


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def megatron_checkpoint_name(root: str, tag: str, mp_rank: int) -> str:
    return os.path.join(root, tag, f"mp_rank_{mp_rank:02d}", "model_optim_rng.pt")


def model_config(args: argparse.Namespace) -> dict[str, int]:
    """What a checkpoint's tensors depend on; a mismatch at load time is a user error."""
    return {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "num_attention_heads": args.num_attention_heads,
        "max_position_embeddings": args.max_position_embeddings,
        "padded_vocab_size": args.padded_vocab_size,
        "model_parallel_size": args.model_parallel_size,
        "pipe_parallel_size": args.pipe_parallel_size,
    }


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def save_torch_file(state: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def client_state(args: argparse.Namespace, iteration: int, consumed_samples: int) -> dict[str, Any]:
    """The state both paths add to a checkpoint: progress, RNG, model shape."""
    state: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "model_config": model_config(args),
    }
    if not args.no_save_rng:
        state["rng_states"] = get_rng_states()
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_weights_finite(backend: Any, iteration: int) -> None:
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


def save_checkpoint(args: argparse.Namespace, backend: Any, iteration: int, consumed_samples: int) -> str:
    """Write checkpoint ``iteration`` under ``args.save``; every rank calls it. Returns its directory."""
    check_weights_finite(backend, iteration)
    tag = checkpoint_tag(iteration)
    staging_tag, final_dir = tag + ".tmp", os.path.join(args.save, tag)
    staging_dir = os.path.join(args.save, staging_tag)
    if dist.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)
        os.makedirs(staging_dir)
    _barrier()
    backend.save_state(args.save, staging_tag, client_state(args, iteration, consumed_samples))
    if os.path.isdir(staging_dir):
        _fsync_tree(staging_dir)
    _barrier()
    if dist.get_rank() == 0:
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(staging_dir, final_dir)
        write_text_atomic(os.path.join(final_dir, COMPLETE_MARKER), f"{iteration}\n")
        write_text_atomic(os.path.join(args.save, TRACKER_FILENAME), f"{iteration}\n")
        if getattr(backend, "writes_deepspeed_latest", False):
            write_text_atomic(os.path.join(args.save, "latest"), tag)
        apply_retention(args.save, args.keep_last_n)
    _barrier()
    return final_dir


def is_complete(load_dir: str, iteration: int) -> bool:
    return os.path.isfile(os.path.join(load_dir, checkpoint_tag(iteration), COMPLETE_MARKER))


def complete_iterations(load_dir: str) -> list[int]:
    """Iterations with a complete checkpoint under ``load_dir``, oldest first."""
    found = []
    for name in os.listdir(load_dir) if os.path.isdir(load_dir) else []:
        if name.startswith("iter_") and name[5:].isdigit() and is_complete(load_dir, int(name[5:])):
            found.append(int(name[5:]))
    return sorted(found)


def latest_iteration(load_dir: str) -> int | None:
    """The iteration the tracker names if complete, else the newest complete one, else None."""
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        if text.isdigit() and is_complete(load_dir, int(text)):
            return int(text)
    iterations = complete_iterations(load_dir)
    return iterations[-1] if iterations else None


def check_model_config(saved: dict[str, int], args: argparse.Namespace, where: str) -> None:
    current = model_config(args)
    saved = {"pipe_parallel_size": 1, **saved}  # checkpoints from before pipelining existed
    diffs = [f"{key}: checkpoint {saved.get(key)} vs run {value}" for key, value in current.items()
             if saved.get(key) != value]
    if diffs:
        hint = (" (reshard it with tools/convert_checkpoint.py reshard)"
                if any(d.startswith("model_parallel_size") for d in diffs) else "")
        raise ConfigError(f"checkpoint {where} does not match this model: {'; '.join(diffs)}{hint}")


def saved_model_parallel_size(directory: str) -> int:
    """How many model-parallel ranks wrote ``directory`` (Megatron or DeepSpeed files)."""
    names = os.listdir(directory)
    megatron = [n for n in names if n.startswith("mp_rank_") and os.path.isdir(os.path.join(directory, n))]
    deepspeed = [n for n in names if n.startswith("mp_rank_") and n.endswith("_model_states.pt")]
    return len(megatron) or len(deepspeed)


def check_model_parallel_size(directory: str, args: argparse.Namespace) -> None:
    saved = saved_model_parallel_size(directory)
    if args.pipe_parallel_size > 1:
        return  # DeepSpeed numbers pipeline x tensor ranks together; model_config is checked instead
    if saved and saved != args.model_parallel_size:
        raise ConfigError(f"checkpoint {directory} was saved with model_parallel_size {saved}, this run uses "
                          f"--model-parallel-size {args.model_parallel_size}; reshard it with "
                          "tools/convert_checkpoint.py reshard, or launch with the saved size")


def load_checkpoint(args: argparse.Namespace, backend: Any) -> tuple[int, int, dict[str, Any] | None]:
    """Load the newest complete checkpoint under ``args.load``.

    Returns (iteration, consumed_samples, RNG states). The caller restores the RNG states with
    ``megatron.rng.set_rng_states`` just before the first step, after everything that may still
    draw from the generators during start-up. Returns (0, 0, None) and says so when there is
    nothing to load.
    """
    if dist.get_rank() == 0 and args.load:
        remove_stale_staging(args.load)
    _barrier()
    iteration = latest_iteration(args.load) if args.load else None
    if iteration is None:
        if mpu.get_data_parallel_rank() == 0 and dist.get_rank() == 0:
            print(f" no complete checkpoint under {args.load}: starting from scratch", flush=True)
        return 0, 0, None
    tag = checkpoint_tag(iteration)
    check_model_parallel_size(os.path.join(args.load, tag), args)
    state = backend.load_state(args.load, tag, load_optimizer=not (args.no_load_optim or args.finetune))
    check_model_config(state.get("model_config", {}), args, os.path.join(args.load, tag))
    if args.finetune:
        return 0, 0, None
    rng_states = None if args.no_load_rng else state.get("rng_states")
    if dist.get_rank() == 0:
        print(f" loaded checkpoint {os.path.join(args.load, tag)} at iteration {state['iteration']}", flush=True)
    return int(state["iteration"]), int(state.get("consumed_samples", 0)), rng_states


def read_megatron_file(path: str) -> dict[str, Any]:
    """``torch.load`` a Megatron-format file safely; a damaged file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file {path} is missing: was it saved with another "
                          "--model-parallel-size, or with --deepspeed?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ConfigError(f"checkpoint file {path} cannot be read ({type(error).__name__}: {error}); "
                          "it is corrupt: load an earlier iteration") from None
