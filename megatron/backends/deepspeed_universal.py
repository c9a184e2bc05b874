"""Loading a checkpoint into a DeepSpeed engine at another topology, through a universal copy.

DeepSpeed ZeRO checkpoints hold each rank's flat partition of the fp32 master weights and Adam
moments, so the engine loads them only at the data-parallel size and stage that wrote them. An
engine configured with ``"checkpoint": {"load_universal": true}`` instead loads one folder per
parameter (fp32 weights, ``exp_avg``, ``exp_avg_sq``, step) at any data-parallel size, ZeRO stage
1-3 and tensor-parallel size. Two converters write such a folder (``megatron.checkpoint.reshard``
chooses): DeepSpeed's own ``ds_to_universal``, for a DeepSpeed checkpoint at another
data-parallel size or ZeRO stage, with the repairs below around its converter and loader; and our
universal copy (``megatron.checkpoint.universal``) for everything else. The copy is staged
under ``--save`` and removed after the load; ``--load`` is never written.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch

from megatron.checkpoint.convert import pipeline_module_name
from megatron.checkpoint.layout import StateCheck, Topology
from megatron.checkpoint.reshard import announce, describe, staged_copy
from megatron.checkpoint.universal import read_slice
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted


def convert_to_universal(source: str, output: str) -> None:
    """DeepSpeed's ``ds_to_universal`` of checkpoint directory ``source`` into ``output`` (which
    must not exist). Only ``output`` and its parent's ``latest_universal`` are written."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=source, output_folder=output, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    quiet = io.StringIO()  # its progress report and bars are not ours to print
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
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


def copy_has_optimizer_state(copy: str) -> bool:
    """Whether the universal copy carries optimizer state and a schedule (DeepSpeed's always does)."""
    states = sorted(glob.glob(os.path.join(copy, "*mp_rank_00_model_states.pt")))
    client = torch.load(states[0], map_location="cpu", weights_only=False)  # our own run's file
    return bool(client.get("has_optimizer_state", True))


def check_loaded_weights(engine: Any, run: RunConfig, copy: str) -> None:
    """Every weight the engine holds is the copy's (in the engine's dtype): DeepSpeed's universal
    loader skips what it does not recognise, and a run must not continue from weights it did not
    load. ZeRO 3 partitions its weights (its loader reads every file or fails), so it is not checked."""
    if run.deepspeed.zero_stage == 3:
        return
    pipelined = run.parallel.pipe_parallel_size > 1
    for name, param in engine.module.named_parameters():
        serial = pipeline_module_name(name, run.model.num_layers) if pipelined else name
        expected = read_slice(copy, serial, "fp32", param.shape).to(param.dtype)
        if not torch.equal(param.detach().cpu(), expected):
            raise TrainingAborted(f"after DeepSpeed's universal load, {name} differs from the checkpoint's weights: "
                                  "nothing was trained; report this with the DeepSpeed version "
                                  f"({version('deepspeed')}), and resume at the saved topology meanwhile")


def deepspeed_converter(source: str, target_stage: int, validate: StateCheck) -> Callable[[str], None]:
    """``convert(output)``: DeepSpeed's ``ds_to_universal`` of ``source``, named for the target,
    after ``validate`` accepted the checkpoint's model description (a changed shape is named, not
    left to DeepSpeed's loader)."""

    def convert(output: str) -> None:
        states = sorted(glob.glob(os.path.join(source, "*mp_rank_00_model_states.pt")))
        if states:
            validate(torch.load(states[0], map_location="cpu", weights_only=False))  # DeepSpeed's file: our run's
        convert_to_universal(source, output)
        match_model_states(output, target_stage)
        match_optimizer_state(output, target_stage)

    return convert


def load_resharded(engine: Any, run: RunConfig, root: str, tag: str, load_optimizer: bool, saved: Topology,
                   convert: Callable[[str], None], how: str) -> tuple[str | None, dict[str, Any]]:
    """Load ``root/tag`` into ``engine`` through the universal copy ``convert`` writes (``how``
    names it in the log); every rank calls it."""
    current = Topology.of(run, run.backend_name)
    with staged_copy(run, root, tag, f"{describe(saved)} -> {describe(current)}", convert) as output:
        # An iteration-0 checkpoint (from-hf) has neither optimizer state nor schedule: a fresh start.
        load_optimizer = load_optimizer and copy_has_optimizer_state(output)
        fresh = None if load_optimizer else snapshot_optimizer_state(engine)
        config = engine._config  # DeepSpeed reads this flag only when loading: set it for this load alone
        config.load_universal_checkpoint = True
        try:
            # Always through the optimizer path: ZeRO 3's module-only universal load looks for ZeRO 3
            # optimizer files; without --load-optim the fresh optimizer is put back below.
            loaded = engine.load_checkpoint(os.path.dirname(output), tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=load_optimizer)
        finally:
            config.load_universal_checkpoint = False
        if loaded[0] is not None:
            check_loaded_weights(engine, run, output)
        if load_optimizer and loaded[0] is not None:
            repair_optimizer_state(engine, output)
        elif loaded[0] is not None:
            restore_optimizer_state(engine, fresh)
        if loaded[0] is not None:
            announce(os.path.join(root, tag), saved, current, load_optimizer, how)
        return loaded
