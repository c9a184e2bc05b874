"""Checkpoint files and directories, for the Megatron and the DeepSpeed path alike.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/complete                              (written last)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt         (Megatron path)
    <save>/iter_0000100/mp_rank_00_model_states.pt, zero_*    (DeepSpeed path)

Names, the tracker and completion marker, durable writes (fsync, atomic rename) and the model
description every checkpoint carries. No process group is needed here: the offline tools use it
as the training run does.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron.errors import ConfigError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "complete"
CHECKPOINT_VERSION = 1
MODEL_CONFIG_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                     "padded_vocab_size", "model_parallel_size", "pipe_parallel_size")


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def megatron_checkpoint_name(root: str, tag: str, mp_rank: int) -> str:
    return os.path.join(root, tag, f"mp_rank_{mp_rank:02d}", "model_optim_rng.pt")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def save_torch_file(state: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


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
        with open(tracker) as handle:
            text = handle.read().strip()
        if text.isdigit() and is_complete(load_dir, int(text)):
            return int(text)
    iterations = complete_iterations(load_dir)
    return iterations[-1] if iterations else None


def check_model_config(saved: dict[str, int], expected: dict[str, int], where: str) -> None:
    """A checkpoint's ``model_config`` against the run's; a difference is a ConfigError."""
    saved = {"pipe_parallel_size": 1, **saved}  # checkpoints from before pipelining existed
    diffs = [f"{key}: checkpoint {saved.get(key)} vs run {value}" for key, value in expected.items()
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
