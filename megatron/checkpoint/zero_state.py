"""DeepSpeed's optimizer files read back into whole tensors, one per parameter (no process group).

A DeepSpeed ZeRO checkpoint holds, per data-parallel rank, a flat partition of each parameter
group's fp32 master weights and Adam moments. This module re-assembles them into the whole
fp32 weight, ``exp_avg`` and ``exp_avg_sq`` of every parameter of one model-parallel file index
(a tensor-parallel rank, or for a pipeline a stage x tensor rank), named as the engine's module
names them. The layouts (DeepSpeed 0.1x):

- ZeRO 1 and 2 (``zero_pp_rank_D_mp_rank_XX_optim_states.pt``): ``param_slice_mappings`` gives
  each parameter's fragment (start, numel) in that rank's partition; the fragments of the
  data-parallel ranks, in rank order, are the flattened parameter.
- ZeRO 3 (same names): every parameter is split on its own into ``ceil(numel / dp)`` elements per
  rank, consecutive in the rank's flat group in ``param_shapes`` order.

Tests check both against DeepSpeed's own ``ds_to_universal``. DeepSpeed's files pickle Python
objects: ``weights_only=False``, so only read checkpoints you trust.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from megatron.errors import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


@dataclass
class ZeroState:
    """The optimizer state of one model-parallel file index, whole per parameter."""

    fp32: dict[str, torch.Tensor]  # module name -> fp32 master weight, shaped as the parameter
    moments: dict[str, dict[str, torch.Tensor]]  # module name -> {"exp_avg": ..., "exp_avg_sq": ...}
    step: torch.Tensor | int  # Adam's step (the same for every parameter)
    param_groups: list[dict[str, Any]]  # the torch optimizer's groups (hyper-parameters)


def trusted_load(path: str) -> Any:
    """A DeepSpeed file (pickled objects, so trusted input only); a damaged one is a ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ConfigError(f"DeepSpeed file {path} cannot be read ({type(error).__name__}); it is corrupt or "
                          "incomplete") from None


def optimizer_files(directory: str, mp_index: int) -> list[str]:
    """The data-parallel ranks' optimizer files of ``mp_index``, in rank order."""
    found = {}
    for path in glob.glob(os.path.join(directory, f"*zero_pp_rank_*_mp_rank_{mp_index:02d}_optim_states.pt")):
        match = _OPTIM_FILE.search(path)
        if match:
            found[int(match.group(1))] = path
    if sorted(found) != list(range(len(found))) or not found:
        raise ConfigError(f"{directory} lacks ZeRO optimizer files of model-parallel rank {mp_index} (found data-"
                          f"parallel ranks {sorted(found)}): the checkpoint is incomplete")
    return [found[rank] for rank in range(len(found))]


def read_zero_state(directory: str, mp_index: int, param_shapes: list[dict[str, torch.Size]]) -> ZeroState:
    """Whole per-parameter optimizer state of ``mp_index`` from its ZeRO 1, 2 or 3 files.

    ``param_shapes``: the model-states file's ``param_shapes`` (one ordered dict per group).
    """
    states = [trusted_load(path)["optimizer_state_dict"] for path in optimizer_files(directory, mp_index)]
    stage = int(states[0].get("zero_stage", 0))
    if stage == 3:
        return _zero3_state(states, param_shapes)
    if stage in (1, 2):
        return _zero12_state(states, param_shapes)
    raise ConfigError(f"{directory}: unknown ZeRO stage {stage!r} in the optimizer files")


def _zero12_state(states: list[dict[str, Any]], param_shapes: list[dict[str, torch.Size]]) -> ZeroState:
    base = [s["base_optimizer_state"] for s in states]
    flats = {"fp32": [s["single_partition_of_fp32_groups"] for s in states],
             **{key: [[b["state"][g][key] for g in sorted(b["state"])] for b in base] for key in MOMENTS}}
    whole: dict[str, dict[str, torch.Tensor]] = {key: {} for key in flats}
    for group, shapes in enumerate(param_shapes):
        for name, shape in shapes.items():
            for key, per_rank in flats.items():
                pieces = []
                for rank, state in enumerate(states):
                    fragment = state["param_slice_mappings"][group].get(name)
                    if fragment is not None:
                        pieces.append(per_rank[rank][group].narrow(0, fragment.start, fragment.numel))
                whole[key][name] = _shaped(torch.cat(pieces), shape, name)
    step = base[0]["state"][min(base[0]["state"])]["step"]
    return ZeroState(whole["fp32"], _by_parameter(whole), step, base[0]["param_groups"])


def _zero3_state(states: list[dict[str, Any]], param_shapes: list[dict[str, torch.Size]]) -> ZeroState:
    world = len(states)
    flats = {"fp32": [s["fp32_flat_groups"] for s in states],
             **{key: [[o["state"][g][key] for g in sorted(o["state"])] for o in
                      (s["optimizer_state_dict"] for s in states)] for key in MOMENTS}}
    whole: dict[str, dict[str, torch.Tensor]] = {key: {} for key in flats}
    for group, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            for key, flat in flats.items():
                pieces = [flat[rank][group].narrow(0, offset, per_rank) for rank in range(world)]
                whole[key][name] = _shaped(torch.cat(pieces)[:numel], shape, name)
            offset += per_rank
    optimizer = states[0]["optimizer_state_dict"]
    step = optimizer["state"][min(optimizer["state"])]["step"]
    return ZeroState(whole["fp32"], _by_parameter(whole), step, optimizer["param_groups"])


def _shaped(flat: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if flat.numel() != math.prod(shape):
        raise ConfigError(f"the ZeRO partitions of {name} hold {flat.numel()} values, the parameter "
                          f"{math.prod(shape)}: the checkpoint is incomplete or from another setup")
    return flat.float().reshape(shape).clone()


def _by_parameter(whole: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {key: whole[key][name] for key in MOMENTS} for name in whole["fp32"]}
