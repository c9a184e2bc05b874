"""Resuming a DeepSpeed checkpoint at another data-parallel size or ZeRO stage, with its optimizer.

DeepSpeed ZeRO checkpoints hold each rank's flat partition of the fp32 master weights and Adam
moments, so the engine loads them only at the data-parallel size and stage that wrote them.
DeepSpeed's own universal checkpoints lift that: ``deepspeed.checkpoint.ds_to_universal`` turns
the partitions into one folder per parameter (fp32 weights, ``exp_avg``, ``exp_avg_sq``, step),
and an engine configured with ``"checkpoint": {"load_universal": true}`` loads such a folder at
any data-parallel size and ZeRO stage 0-3. This module decides when a resume needs that, runs the
conversion into a scratch directory under ``--save`` (the run holds its writer lock; the
directory read, ``--load``, is never written), loads from it and removes it.

Supported here: the DeepSpeed path without tensor or pipeline parallelism on either side (the
universal format merges tensor-parallel slices only with parameter patterns this model does not
declare yet); other changes are refused with a one-line error.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.checkpoint.layout import Topology, read_manifest, write_failure
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted


def run_topology(run: RunConfig) -> Topology:
    return Topology.of(run, "deepspeed")


def _inferred_topology(directory: str, current: Topology) -> Topology | None:
    """The topology of a checkpoint written before manifests recorded it, from its file names:
    ZeRO 3 writes a model-states file per rank, ZeRO 1/2 an optimizer file per data-parallel
    rank (stages 1 and 2 share a layout: the current stage is assumed), stage 0 neither."""
    zero3 = glob.glob(os.path.join(directory, "zero_pp_rank_*_mp_rank_00_model_states.pt"))
    optim = glob.glob(os.path.join(directory, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    models = glob.glob(os.path.join(directory, "mp_rank_*_model_states.pt"))
    mp_size = max(len(models), 1)
    if zero3:
        return Topology("deepspeed", 3, len(zero3), mp_size, 1)
    if optim:
        stage = current.zero_stage if current.zero_stage in (1, 2) else 1
        return Topology("deepspeed", stage, len(optim), mp_size, 1)
    if models:  # stage 0: the optimizer is whole in the model-states file, at any data-parallel size
        return Topology("deepspeed", 0, current.data_parallel_size, mp_size, 1)
    return None  # not DeepSpeed's


def saved_topology(directory: str, current: Topology) -> Topology | None:
    """How the DeepSpeed checkpoint in ``directory`` was laid out; None when unknown."""
    manifest = read_manifest(directory)
    recorded = manifest.topology if manifest is not None else None
    if recorded is not None and recorded.path.startswith("deepspeed"):
        return recorded
    return _inferred_topology(directory, current)


def _layout(topology: Topology) -> tuple[int, int]:
    """What decides the partition layout: ZeRO 0 (no partitions) and ZeRO 1/2 (one layout) share
    nothing with ZeRO 3; the data-parallel size sets the partitions."""
    kind = 3 if topology.zero_stage == 3 else (1 if topology.zero_stage in (1, 2) else 0)
    return kind, topology.data_parallel_size if kind else 1


def needs_resharding(saved: Topology | None, current: Topology, directory: str) -> bool:
    """True when the engine cannot load ``saved`` as it is but DeepSpeed's universal checkpoint
    can; ConfigError, naming both topologies and what to launch instead, for a change this does
    not support: tensor or pipeline parallelism, and ZeRO stage 0 on either side (its optimizer
    is not partitioned, and DeepSpeed converts only partitioned ones)."""
    if saved is None:
        return False
    sizes_differ = (saved.model_parallel_size, saved.pipe_parallel_size) != \
        (current.model_parallel_size, current.pipe_parallel_size)
    if sizes_differ:
        raise _unsupported(saved, current, directory, "launch with the saved --model-parallel-size and "
                           "--pipe-parallel-size, or convert the weights with tools/convert_checkpoint.py reshard "
                           "(without optimizer state)")
    if _layout(saved) == _layout(current):
        return False
    if (saved.model_parallel_size, saved.pipe_parallel_size) != (1, 1):
        raise _unsupported(saved, current, directory, "with tensor or pipeline parallelism, launch at the saved ZeRO "
                           f"stage ({saved.zero_stage}) and data-parallel size ({saved.data_parallel_size})")
    if 0 in (saved.zero_stage, current.zero_stage):
        keep = saved.zero_stage if saved.zero_stage == 0 else "1, 2 or 3"
        raise _unsupported(saved, current, directory, f"ZeRO stage 0 does not partition the optimizer, and DeepSpeed "
                           f"converts only partitioned checkpoints: launch at ZeRO stage {keep}")
    return True


def _unsupported(saved: Topology, current: Topology, directory: str, fix: str) -> ConfigError:
    return ConfigError(f"checkpoint {directory} was saved at {saved.describe()}; this run is {current.describe()}: "
                       f"that change is not supported: {fix}")


def convert_to_universal(source: str, output: str) -> None:
    """DeepSpeed's ``ds_to_universal`` of checkpoint directory ``source`` into ``output`` (which
    must not exist). Only ``output`` and its parent's ``latest_universal`` are written."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=output, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)


def match_model_states(output: str, target_stage: int) -> None:
    """Name the universal copy's model-states file as the target engine looks for it: ZeRO 3
    engines read ``zero_pp_rank_0_mp_rank_00_model_states.pt``, the others
    ``mp_rank_00_model_states.pt``. A ZeRO 3 source's file holds placeholders for the weights:
    they are filled from the universal fp32 weights for a target that loads the module whole."""
    zero3_name = os.path.join(output, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    plain_name = os.path.join(output, "mp_rank_00_model_states.pt")
    if target_stage == 3 and not os.path.exists(zero3_name):
        shutil.copyfile(plain_name, zero3_name)
    elif target_stage != 3 and not os.path.exists(plain_name):
        state = torch.load(zero3_name, map_location="cpu", weights_only=False)  # DeepSpeed's file: our own run's
        shapes = {name: shape for group in state["param_shapes"] for name, shape in group.items()}
        optimizer_file = os.path.join(output, "zero", "optimizer_state.pt")
        optimizer = torch.load(optimizer_file, map_location="cpu", weights_only=False)
        step = optimizer["optimizer_state_dict"]["state"][0]["step"]  # equal for every parameter
        module = state["module"]
        for name, placeholder in module.items():
            torch.save(step, os.path.join(output, "zero", name, "step.pt"))
            for key in ("fp32", "exp_avg", "exp_avg_sq"):  # ZeRO 3 writes flat tensors, ZeRO 1/2 read shaped ones
                path = os.path.join(output, "zero", name, f"{key}.pt")
                value = torch.load(path, map_location="cpu", weights_only=False)
                if not isinstance(value, dict):
                    torch.save({"cat_dim": 0, "param": value.reshape(shapes[name])}, path)
            full = torch.load(os.path.join(output, "zero", name, "fp32.pt"), map_location="cpu", weights_only=False)
            module[name] = full["param"].to(placeholder.dtype)
        torch.save(state, plain_name)


def match_optimizer_state(output: str, target_stage: int) -> None:
    """Make ``zero/optimizer_state.pt`` what the target engine reads: ZeRO 3 reads the step and
    hyper-parameters from ``optimizer_state_dict``, which the conversion of a ZeRO 1/2 checkpoint
    does not write (the step of any parameter: they are all equal); ZeRO 1/2 require
    ``ds_version``, which a ZeRO 3 source does not carry."""
    import deepspeed
    path = os.path.join(output, "zero", "optimizer_state.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's file: our own run's
    if target_stage == 3 and "optimizer_state_dict" not in state:
        steps = glob.glob(os.path.join(output, "zero", "*", "step.pt"))
        step = torch.load(steps[0], map_location="cpu", weights_only=False) if steps else 0
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    elif target_stage != 3 and not state.get("ds_version"):
        state["ds_version"] = deepspeed.__version__  # a ZeRO 3 source's global state does not carry it
    else:
        return
    torch.save(state, path)


def repair_optimizer_state(engine: Any, output: str) -> None:
    """Undo two slips of DeepSpeed's ZeRO 3 universal load: it copies the first parameter group's
    hyper-parameters onto every group (weight decay on the biases and LayerNorm weights, which our
    second group exempts), and gives every parameter one shared ``step`` tensor."""
    path = os.path.join(output, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)["param_groups"]  # DeepSpeed's file: our run's
    groups = engine.optimizer.optimizer.param_groups  # the torch optimizer inside ZeRO's
    if len(saved) != len(groups):
        raise ConfigError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's {len(groups)}: "
                          "it was written by another model or optimizer setup")
    for group, values in zip(groups, saved):
        group.update({key: value for key, value in values.items() if key != "params"})
    # ZeRO 3's universal load hands every parameter the same ``step`` tensor; torch's Adam
    # increments each parameter's step in place, so a shared one would count once per group.
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


@dataclass
class OptimizerSnapshot:
    """The engine's optimizer as built, before any load: its state (torch's Adam creates it at
    the first step, so usually empty) and each group's hyper-parameters."""

    state: dict[Any, dict[str, Any]]
    groups: list[dict[str, Any]]


def snapshot_optimizer_state(engine: Any) -> OptimizerSnapshot:
    optimizer = engine.optimizer.optimizer
    state = {param: {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in values.items()}
             for param, values in optimizer.state.items()}
    groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return OptimizerSnapshot(state, groups)


def restore_optimizer_state(engine: Any, snapshot: OptimizerSnapshot) -> None:
    """Put back what ``snapshot`` took: DeepSpeed's universal loads read the Adam moments (ZeRO
    1/2) and the saved hyper-parameters (every stage) even when told not to, and
    ``--no-load-optim``/``--finetune`` must mean what they mean on the same topology (the
    engine's fresh optimizer, this run's --lr)."""
    optimizer = engine.optimizer.optimizer
    optimizer.state.clear()
    optimizer.state.update(snapshot.state)
    for group, values in zip(optimizer.param_groups, snapshot.groups, strict=True):
        group.update(values)


def _scratch_root(run: RunConfig) -> str:
    """Where the universal copy is staged: under ``--save`` (this run holds its writer lock).
    Every rank checks ``--save`` (it is configuration), so a refusal stops them all."""
    if not run.checkpoint.save:
        raise ConfigError("resuming a DeepSpeed checkpoint at another data-parallel size or ZeRO stage stages a "
                          "converted copy under --save: pass --save")
    return os.path.join(run.checkpoint.save, f".reshard-{os.getpid()}")


def _conversion_failure(error: BaseException, save: str) -> tuple[str, bool]:
    """(message, the user's fault) for a failed conversion: a failed write (a full disk) is not."""
    written = write_failure(error, save) if isinstance(error, OSError | RuntimeError) else None
    if written is not None:
        return f"the converted copy could not be written under --save {save}: {written}", False
    return f"{type(error).__name__}: {str(error)[:300]}", True


def load_resharded(engine: Any, run: RunConfig, root: str, tag: str, load_optimizer: bool,
                   saved: Topology) -> tuple[str | None, dict[str, Any]]:
    """Load ``root/tag`` into ``engine`` through a universal copy; every rank calls it."""
    scratch = [_scratch_root(run)]
    dist.broadcast_object_list(scratch, src=0)
    output = os.path.join(scratch[0], tag)
    failure: list[tuple[str, bool] | None] = [None]
    if dist.get_rank() == 0:
        shutil.rmtree(scratch[0], ignore_errors=True)
        try:
            convert_to_universal(os.path.join(root, tag), output)
            match_model_states(output, run.deepspeed.zero_stage)
            match_optimizer_state(output, run.deepspeed.zero_stage)
        except Exception as error:  # noqa: BLE001 - reported on every rank below
            failure = [_conversion_failure(error, run.checkpoint.save)]
    dist.broadcast_object_list(failure, src=0)
    try:
        if failure[0] is not None:
            message, users = failure[0]
            text = f"DeepSpeed could not convert {os.path.join(root, tag)} ({saved.describe()}) to a universal " \
                   f"checkpoint: {message}"
            raise ConfigError(text) if users else TrainingAborted(text)
        fresh = None if load_optimizer else snapshot_optimizer_state(engine)
        config = engine._config  # DeepSpeed reads this flag only when loading: set it for this load alone
        config.load_universal_checkpoint = True
        try:
            # Always through the optimizer path: ZeRO 3's module-only universal load looks for ZeRO 3
            # optimizer files; without --load-optim the fresh optimizer is put back below.
            loaded = engine.load_checkpoint(scratch[0], tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=load_optimizer)
        finally:
            config.load_universal_checkpoint = False
        if load_optimizer and loaded[0] is not None:
            repair_optimizer_state(engine, output)
        elif loaded[0] is not None:
            restore_optimizer_state(engine, fresh)
        if dist.get_rank() == 0 and loaded[0] is not None:
            what = ("weights, fp32 master weights, Adam moments and step, learning-rate schedule" if load_optimizer
                    else "weights only (--no-load-optim/--finetune)")
            print(f" resharded checkpoint {os.path.join(root, tag)}: {saved.describe()} -> "
                  f"{run_topology(run).describe()}, through DeepSpeed's universal checkpoint ({what})", flush=True)
        return loaded
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(scratch[0], ignore_errors=True)
