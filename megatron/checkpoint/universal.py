"""A universal copy of a checkpoint: one folder per parameter holding its whole (serial) fp32
weight and Adam moments, from which any topology takes its slices.

Resuming at another tensor- or pipeline-parallel size, or on the other training path, goes
through it: rank 0 reads the checkpoint (``megatron.checkpoint.convert``: Megatron files at any
model-parallel size, DeepSpeed's ZeRO 0-3 files at any data-, tensor- and pipeline-parallel size)
and writes the copy; every rank then reads only its own slices, one parameter at a time. The
layout is DeepSpeed's universal checkpoint, so a DeepSpeed engine loads it with ``load_universal``
(DeepSpeed slices by the ``cat_dim``/``param_n_sub_params``/``vocab_tensor`` keys written here);
the Megatron path slices it with ``mpu.partition_master_weight``::

    <copy>/<tag>/zero/<parameter>/fp32.pt        {"param": whole fp32 tensor, "cat_dim": 0 or 1, ...}
    <copy>/<tag>/zero/<parameter>/exp_avg.pt     (and exp_avg_sq.pt) the same for the Adam moments
    <copy>/<tag>/zero/<parameter>/step.pt        Adam's step
    <copy>/<tag>/zero/optimizer_state.pt         the optimizer's parameter groups and step
    <copy>/<tag>/mp_rank_XX_model_states.pt      per target model-parallel rank: progress, schedule,
                                                 RNG, model description (and DeepSpeed's own keys)

The embedding is stored without vocabulary padding (the target pads for its model-parallel size).
Everything here is plain tensors and values: it loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

import torch

from megatron import mpu
from megatron.checkpoint.convert import (
    Checkpoint,
    partition_spec,
    pipeline_name_of,
    repad_vocab,
    resharded_rng_states,
)
from megatron.checkpoint.layout import CHECKPOINT_VERSION, Topology, save_torch_file
from megatron.errors import ConfigError

EMBEDDING = "word_embeddings.weight"
MOMENTS = ("exp_avg", "exp_avg_sq")


def parameter_layout(name: str) -> dict[str, Any]:
    """How DeepSpeed's universal loader slices parameter ``name`` for a tensor-parallel rank:
    along ``cat_dim``, the query/key/value weight as three sub-parameters (our stride 3), the
    embedding re-padded to the target's vocabulary."""
    spec = partition_spec(name)
    layout: dict[str, Any] = {"cat_dim": 0 if spec is None else spec[0]}
    if spec is not None and spec[1] > 1:
        layout["param_n_sub_params"] = spec[1]
    if name == EMBEDDING:
        layout["vocab_tensor"] = True
    return layout


def _whole_tensors(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """fp32 weight (the master where there is one) and Adam moments of ``name``, serial."""
    optimizer = checkpoint.optimizer
    masters = optimizer.get("masters") if optimizer else None
    tensors = {"fp32": (masters[name] if masters else checkpoint.model[name]).float()}
    state = optimizer["param_state"].get(name, {}) if optimizer is not None else {}
    for key in MOMENTS:  # zeros without optimizer state: DeepSpeed's ZeRO 3 loader reads every file
        tensors[key] = state[key].float() if key in state else torch.zeros_like(tensors["fp32"])
    if name == EMBEDDING:
        rows = int(checkpoint.model_config.get("vocab_size") or tensors["fp32"].size(0))
        tensors = {key: value[:rows].clone() for key, value in tensors.items()}
    return tensors


def write_parameters(checkpoint: Checkpoint, output: str) -> None:
    """``zero/<name>/*.pt`` of every parameter, and ``zero/optimizer_state.pt``."""
    step = _step(checkpoint)
    for name in checkpoint.model:
        folder = os.path.join(output, "zero", name)
        layout = parameter_layout(name)
        for key, tensor in _whole_tensors(checkpoint, name).items():
            save_torch_file({"param": tensor, **layout}, os.path.join(folder, f"{key}.pt"))
        if step is not None:  # a bare tensor: DeepSpeed's loader takes the file's content as the step
            save_torch_file(step, os.path.join(folder, "step.pt"))
    optimizer = checkpoint.optimizer or {}
    # DeepSpeed loads the folders group by group, zipping its groups with these: without optimizer
    # state, two groups (decay, no decay) that change no hyper-parameter.
    groups = optimizer.get("param_groups") or [{"params": []}, {"params": []}]
    state = _optimizer_state(groups, step, optimizer.get("wrapper"))
    save_torch_file(state, os.path.join(output, "zero", "optimizer_state.pt"))


def _step(checkpoint: Checkpoint) -> torch.Tensor | None:
    """Adam's step (the same for every parameter); None without optimizer state."""
    if checkpoint.optimizer is None:
        return None
    for state in checkpoint.optimizer["param_state"].values():
        if "step" in state:
            return torch.as_tensor(state["step"], dtype=torch.float32).clone()
    return None


def _optimizer_state(groups: list[dict[str, Any]], step: torch.Tensor | None,
                     wrapper: dict[str, Any] | None) -> dict[str, Any]:
    """What DeepSpeed's ZeRO 1-3 universal loads read from ``optimizer_state.pt``, and our own
    (the loss scaler of a Megatron-path fp16/bf16 checkpoint)."""
    plain = [dict(group) for group in groups]
    scaler = {key: wrapper[key] for key in ("loss_scaler", "dynamic_loss_scale", "overflow", "skipped_steps")
              if key in wrapper} if wrapper else None
    return {"loss_scaler_state": scaler, "param_groups": plain,
            "ds_version": version("deepspeed"),  # DeepSpeed's loader requires one
            "optimizer_state_dict": {"state": {0: {"step": step if step is not None else torch.tensor(0.0)}},
                                     "param_groups": plain},
            "has_optimizer_state": step is not None}


def client_states(checkpoint: Checkpoint, target: Topology, target_config: dict[str, Any],
                  seed: int) -> list[dict[str, Any]]:
    """Each target model-parallel rank's progress, schedule, RNG and model description, with the
    keys a DeepSpeed engine reads from a model-states file."""
    rng = resharded_rng_states(checkpoint.rng_states, target.model_parallel_size, seed) \
        if checkpoint.rng_states else None
    files = target.model_parallel_size * (target.pipe_parallel_size if target.path == "deepspeed-pipeline" else 1)
    config = {**checkpoint.model_config, **{key: target_config[key] for key in (
        "model_parallel_size", "pipe_parallel_size", "padded_vocab_size") if key in target_config}}
    states = []
    for rank in range(target.model_parallel_size):
        state: dict[str, Any] = {
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": checkpoint.iteration,
            "consumed_samples": checkpoint.consumed_samples, "model_config": config,
            "lr_scheduler": checkpoint.lr_scheduler, "module": None, "optimizer": None,
            "global_steps": checkpoint.iteration, "global_samples": checkpoint.consumed_samples,
            "skipped_steps": 0, "dp_world_size": target.data_parallel_size,
            "mp_world_size": files, "buffer_names": [], "param_shapes": None,
            "ds_config": {}, "resharded_from": dict(checkpoint.model_config),
            "has_optimizer_state": checkpoint.optimizer is not None and checkpoint.lr_scheduler is not None}
        if rng is not None:
            state["rng_states"] = rng[rank]
        states.append(state)
    return states


def write_universal(checkpoint: Checkpoint, output: str, target: Topology, target_config: dict[str, Any],
                    seed: int) -> None:
    """The universal copy of ``checkpoint`` for ``target`` under ``output`` (a new directory).

    For a pipeline target every parameter folder is also reachable by the name DeepSpeed's
    ``PipelineModule`` gives it (a link), and there is a model-states file per stage x tensor rank."""
    write_parameters(checkpoint, output)
    states = client_states(checkpoint, target, target_config, seed)
    pipelined = target.path == "deepspeed-pipeline"
    for stage in range(target.pipe_parallel_size if pipelined else 1):
        for rank, state in enumerate(states):
            index = stage * target.model_parallel_size + rank
            save_torch_file(state, os.path.join(output, f"mp_rank_{index:02d}_model_states.pt"))
            if target.zero_stage == 3:  # DeepSpeed's ZeRO 3 engines read this name
                save_torch_file(state, os.path.join(output, f"zero_pp_rank_0_mp_rank_{index:02d}_model_states.pt"))
    if pipelined:
        num_layers = int(checkpoint.model_config["num_layers"])
        for name in checkpoint.model:
            os.symlink(name, os.path.join(output, "zero", pipeline_name_of(name, num_layers)))


def _read(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"the universal copy lacks {path}: the checkpoint holds another model") from None


def read_client_state(copy: str, mp_rank: int) -> dict[str, Any]:
    return _read(os.path.join(copy, f"mp_rank_{mp_rank:02d}_model_states.pt"))


def read_optimizer_state(copy: str) -> dict[str, Any]:
    return _read(os.path.join(copy, "zero", "optimizer_state.pt"))


def read_slice(copy: str, name: str, key: str, shape: torch.Size) -> torch.Tensor:
    """This model-parallel rank's slice of ``key`` (fp32, exp_avg, exp_avg_sq) of ``name``; only
    this parameter's whole tensor is in memory."""
    whole = _read(os.path.join(copy, "zero", name, f"{key}.pt"))["param"]
    mp_size, mp_rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    spec = partition_spec(name)
    if name == EMBEDDING:
        rows = shape[0] * mp_size
        if whole.size(0) > rows:
            raise ConfigError(f"the checkpoint's vocabulary ({whole.size(0)} rows) does not fit this run's padded "
                              f"vocabulary ({rows}): pass the tokenizer it was trained with")
        whole = repad_vocab(whole, rows)
    part = whole if spec is None else mpu.partition_master_weight(whole, spec[0], mp_size, mp_rank, spec[1])
    if part.shape != shape:
        raise ConfigError(f"{name}: the checkpoint's slice is {tuple(part.shape)}, this run's parameter "
                          f"{tuple(shape)}: the checkpoint holds another model shape")
    return part


def read_step(copy: str, name: str) -> torch.Tensor | None:
    path = os.path.join(copy, "zero", name, "step.pt")
    return _read(path) if os.path.isfile(path) else None
