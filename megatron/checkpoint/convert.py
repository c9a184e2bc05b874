"""Offline checkpoint reading, writing and resharding: no process group, no training.

A checkpoint (``megatron.checkpoint.layout``, Megatron or DeepSpeed files, any model-parallel
size) is read into one ``Checkpoint`` whose tensors are *serial*: the model-parallel shards are
merged back into the tensors a model-parallel size of 1 would hold. Writing splits them again for
any size. Merging and splitting are exact inverses of ``mpu.partition_master_weight``.

Trust: our own files are read with ``torch.load(weights_only=True)``. DeepSpeed's
``*_model_states.pt`` / ``*_optim_states.pt`` pickle Python objects and need
``weights_only=False``: only read DeepSpeed checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron import mpu
from megatron.checkpoint.layout import (
    CHECKPOINT_VERSION,
    COMPLETE_MARKER,
    TRACKER_FILENAME,
    checkpoint_files,
    checkpoint_tag,
    complete_iterations,
    file_digest,
    is_complete,
    manifest_text,
    megatron_checkpoint_name,
    read_megatron_file,
    save_torch_file,
    write_failure,
    write_text_atomic,
)
from megatron.checkpoint.verify import choose_checkpoint, describe, verify_checkpoint
from megatron.checkpoint.zero_state import MOMENTS, ZeroState, read_zero_state
from megatron.errors import ConfigError, TrainingAborted

StateDict = dict[str, torch.Tensor]
_LAYERNORM_NAMES = ("input_layernorm.", "post_attention_layernorm.", "final_layernorm.")


def partition_spec(name: str) -> tuple[int, int] | None:
    """``(partition_dim, stride)`` of a sharded ``GPT2Model`` parameter, None if replicated.

    Mirrors the tags ``mpu.mark_model_parallel`` puts on the live parameters (a test checks it).
    """
    if name == "word_embeddings.weight":
        return 0, 1
    if ".attention.query_key_value." in name:
        return 0, 3
    if ".mlp.dense_h_to_4h." in name:
        return 0, 1
    if name.endswith((".attention.dense.weight", ".mlp.dense_4h_to_h.weight")):
        return 1, 1
    return None


def merge_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``partition_master_weight``: rank r holds chunks r, r + k, ... of k * stride."""
    if len(shards) == 1:
        return shards[0].clone()
    pieces = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][j] for j in range(stride) for rank in range(len(shards))], dim=dim)


def merge_tensor(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    spec = partition_spec(name)
    return shards[0].clone() if spec is None else merge_shards(shards, *spec)


def split_tensor(name: str, full: torch.Tensor, mp_size: int) -> list[torch.Tensor]:
    spec = partition_spec(name)
    if spec is None:
        return [full.clone() for _ in range(mp_size)]
    dim, stride = spec
    if full.size(dim) % (stride * mp_size):
        raise ConfigError(f"{name} ({tuple(full.shape)}) cannot be split {mp_size} ways along dim {dim}; "
                          "pick a --model-parallel-size that divides the heads and the padded vocabulary")
    return [mpu.partition_master_weight(full, dim, mp_size, rank, stride) for rank in range(mp_size)]


def merge_state_dicts(shards: list[StateDict]) -> StateDict:
    return {name: merge_tensor(name, [shard[name] for shard in shards]) for name in shards[0]}


def split_state_dict(serial: StateDict, mp_size: int) -> list[StateDict]:
    per_rank: list[StateDict] = [{} for _ in range(mp_size)]
    for name, full in serial.items():
        for rank, shard in enumerate(split_tensor(name, full, mp_size)):
            per_rank[rank][name] = shard
    return per_rank


def repad_vocab(tensor: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Rows of an embedding-shaped tensor cut or zero-filled to ``padded_vocab_size``."""
    if tensor.size(0) >= padded_vocab_size:
        return tensor[:padded_vocab_size].clone()
    padded = tensor.new_zeros((padded_vocab_size, *tensor.shape[1:]))
    padded[: tensor.size(0)] = tensor
    return padded


def optimizer_param_names(model_names: list[str]) -> list[str]:
    """Parameter names in the optimizer's index order.

    ``gpt2_get_params_for_weight_decay_optimization`` walks modules in state-dict order and puts
    weights first, then biases and LayerNorm parameters; the optimizer numbers them in that order.
    """
    def no_decay(name: str) -> bool:
        return name.endswith(".bias") or any(part in name for part in _LAYERNORM_NAMES)

    return [n for n in model_names if not no_decay(n)] + [n for n in model_names if no_decay(n)]


@dataclass
class Checkpoint:
    """A whole checkpoint in memory with serial (model-parallel size 1) tensors.

    ``optimizer`` (Megatron path only) is ``{"param_state": {name: {key: serial tensor or value}},
    "masters": {name: fp32 tensor} | None, "wrapped": rank 0's state without per-parameter parts}``.
    ``rng_states`` holds one entry per source model-parallel rank.
    """

    model: StateDict
    model_config: dict[str, int]
    iteration: int
    consumed_samples: int
    kind: str  # "megatron" or "deepspeed"
    optimizer: dict[str, Any] | None = None
    lr_scheduler: dict[str, Any] | None = None
    rng_states: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def padded_vocab_size(self) -> int:
        embedding = self.model.get("word_embeddings.weight")
        if embedding is None:
            raise ConfigError(f"the checkpoint holds no GPT-2 model (no word_embeddings.weight; its tensors begin "
                              f"{sorted(self.model)[:2]}): is it a BERT checkpoint? Point --load at a GPT-2 one")
        return embedding.size(0)


def find_iteration(load: str, iteration: int | None = None) -> int:
    """The complete, verified iteration to read under ``load``: ``iteration`` if given (refused if
    damaged), else the newest that verifies (a damaged newer one is skipped out loud)."""
    if not os.path.isdir(load):
        raise ConfigError(f"checkpoint directory {load!r} does not exist; check --load")
    if iteration is not None:
        if not is_complete(load, iteration):
            raise ConfigError(f"{load} has no complete checkpoint at iteration {iteration}; complete ones: "
                              f"{complete_iterations(load) or 'none'}")
        verdict = verify_checkpoint(os.path.join(load, checkpoint_tag(iteration)))
        if not verdict.ok:
            raise ConfigError(f"checkpoint {verdict.directory} is damaged: {describe(verdict)}; pick another "
                              "iteration (or none: the newest that verifies is taken) or restore the files")
        return iteration
    chosen = choose_checkpoint(load, lambda message: print(message, flush=True))
    if chosen is None:
        raise ConfigError(f"{load!r} holds no complete checkpoint (no iter_XXXXXXX/{COMPLETE_MARKER}); "
                          "point --load at a directory written by pretrain_gpt2.py --save")
    return chosen[0]


def checkpoint_kind(directory: str) -> str:
    """``megatron`` (mp_rank_XX/ folders), ``deepspeed-pipeline`` (``layer_XX-model_YY`` files) or
    ``deepspeed`` (``*_model_states.pt`` files)."""
    if os.path.isdir(os.path.join(directory, "mp_rank_00")):
        return "megatron"
    if glob.glob(os.path.join(directory, "layer_00-model_00-model_states.pt")):
        return "deepspeed-pipeline"
    if glob.glob(os.path.join(directory, "*mp_rank_00_model_states.pt")):
        return "deepspeed"
    raise ConfigError(f"{directory} holds neither Megatron (mp_rank_00/model_optim_rng.pt) nor DeepSpeed "
                      "(mp_rank_00_model_states.pt) checkpoint files")


def _source_mp_size(directory: str, kind: str) -> int:
    if kind == "megatron":
        names = glob.glob(os.path.join(directory, "mp_rank_[0-9][0-9]"))
    else:
        names = {re.search(r"mp_rank_(\d+)_model_states", p).group(1)
                 for p in glob.glob(os.path.join(directory, "*mp_rank_*_model_states.pt"))}
    return len(names)


def read_checkpoint(load: str, iteration: int | None = None, with_optimizer: bool = True) -> Checkpoint:
    """Read the checkpoint under ``load`` (see ``find_iteration``) and merge its shards."""
    iteration = find_iteration(load, iteration)
    return read_checkpoint_directory(os.path.join(load, checkpoint_tag(iteration)), with_optimizer)


def read_checkpoint_directory(directory: str, with_optimizer: bool = True,
                              deepspeed_optimizer: bool = False) -> Checkpoint:
    """Read one checkpoint directory (already verified) and merge its shards. ``with_optimizer``:
    a Megatron checkpoint's optimizer state; ``deepspeed_optimizer``: a DeepSpeed one's too (its
    ZeRO partitions re-assembled; see ``megatron.checkpoint.zero_state``)."""
    kind = checkpoint_kind(directory)
    if kind == "deepspeed-pipeline":
        checkpoint = _read_pipeline_checkpoint(directory)
        if deepspeed_optimizer:
            checkpoint.optimizer = _pipeline_optimizer(directory, checkpoint.model_config)
        return checkpoint
    mp_size = _source_mp_size(directory, kind)
    if kind == "megatron":
        root, tag = os.path.split(os.path.normpath(directory))
        shards = [read_megatron_file(megatron_checkpoint_name(root, tag, rank)) for rank in range(mp_size)]
        checkpoint = _from_shards(shards, [s["model"] for s in shards], kind)
        if with_optimizer and all("optimizer" in s for s in shards):
            checkpoint.optimizer = merge_optimizer([s["optimizer"] for s in shards], [s["model"] for s in shards])
        return checkpoint
    shards = [_read_deepspeed_file(directory, rank) for rank in range(mp_size)]
    stage = int(shards[0].get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    models = [_deepspeed_module(directory, rank, shard, stage) for rank, shard in enumerate(shards)]
    checkpoint = _from_shards(shards, models, kind)
    if deepspeed_optimizer:
        checkpoint.optimizer = _deepspeed_optimizer(directory, shards, stage, models)
    else:
        checkpoint.notes.append(f"DeepSpeed ZeRO stage {stage} checkpoint: optimizer state not converted "
                                "(it lives in DeepSpeed's flat ZeRO partitions)")
    return checkpoint


def _deepspeed_optimizer(directory: str, shards: list[dict[str, Any]], stage: int,
                         models: list[StateDict]) -> dict[str, Any]:
    """Serial optimizer state of a DeepSpeed checkpoint without pipelining (``merge_optimizer``'s format)."""
    if stage == 0:
        optimizers = [s.get("optimizer") for s in shards]
        if all(isinstance(o, dict) and "fp32_groups" in o for o in optimizers):
            return _deepspeed_half_optimizer(directory, optimizers, models)
        try:
            return merge_optimizer(optimizers, models)
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"{directory}: the optimizer of this ZeRO stage 0 checkpoint is DeepSpeed's own "
                              "(bf16/fp16) and cannot be resharded: resume at its saved topology") from None
    states = [[read_zero_state(directory, rank, shard["param_shapes"])] for rank, shard in enumerate(shards)]
    return _serial_zero_optimizer(states, lambda name: name)


def _deepspeed_half_optimizer(directory: str, optimizers: list[dict[str, Any]],
                              models: list[StateDict]) -> dict[str, Any]:
    """ZeRO stage 0 under DeepSpeed's own fp16/bf16 wrapper: the wrapped optimizer's state and the
    fp32 master weights (``fp32_groups``: per parameter group, the masters in the optimizer's
    order), as the ZeRO stages give them. Merging the wrapped state alone took the half-precision
    weights as masters."""
    merged = merge_optimizer([o["optimizer_state_dict"] for o in optimizers], models)
    names = optimizer_param_names(list(models[0]))
    flat = [[tensor for group in o["fp32_groups"] for tensor in group] for o in optimizers]
    if any(len(masters) != len(names) for masters in flat):
        raise ConfigError(f"{directory}: the fp32 master weights of this ZeRO stage 0 checkpoint number "
                          f"{len(flat[0])}, the model's parameters {len(names)}: it is not a GPT-2 checkpoint "
                          "of this codebase")
    merged["masters"] = {name: merge_tensor(name, [masters[i] for masters in flat]) for i, name in enumerate(names)}
    return merged


def _pipeline_optimizer(directory: str, config: dict[str, Any]) -> dict[str, Any]:
    """Serial optimizer state of a DeepSpeed pipeline checkpoint: file index stage x tensor
    rank, module names as ``PipelineModule`` gives them (renamed to the serial ones)."""
    mp_size, pipe_size = int(config.get("model_parallel_size", 1)), int(config.get("pipe_parallel_size", 1))
    num_layers = int(config.get("num_layers", 0))
    states: list[list[ZeroState]] = [[] for _ in range(mp_size)]
    for stage in range(pipe_size):
        for tp_rank in range(mp_size):
            index = stage * mp_size + tp_rank
            shapes = _read_deepspeed_file(directory, index)["param_shapes"]
            states[tp_rank].append(read_zero_state(directory, index, shapes))
    return _serial_zero_optimizer(states, lambda name: pipeline_module_name(name, num_layers))


def pipeline_module_name(name: str, num_layers: int) -> str | None:
    """Our serial name of ``PipelineModule`` parameter ``name`` (``tied_modules.embed.X`` or
    ``<block>.X``); None for one without a serial twin."""
    if name.startswith("tied_modules.embed."):
        return name[len("tied_modules.embed."):]
    block, _, rest = name.partition(".")
    return pipeline_layer_name(int(block), num_layers, rest) if block.isdigit() else None


def pipeline_name_of(serial_name: str, num_layers: int) -> str:
    """Inverse of ``pipeline_module_name``: the ``PipelineModule`` name of serial ``serial_name``."""
    if serial_name.startswith("transformer.layers."):
        layer, _, rest = serial_name[len("transformer.layers."):].partition(".")
        return f"{int(layer) + 1}.{rest}"
    if serial_name.startswith("transformer.final_layernorm."):
        return f"{num_layers + 1}.{serial_name[len('transformer.final_layernorm.'):]}"
    return f"tied_modules.embed.{serial_name}"


def _serial_zero_optimizer(states: list[list[ZeroState]], serial_name: Any) -> dict[str, Any]:
    """``states[tp_rank]``: that tensor rank's ZeRO states (one per pipeline stage) -> the serial
    masters and Adam state; a parameter two stages share (the tied embedding) is taken once."""
    per_rank: list[dict[str, tuple[ZeroState, str]]] = []
    for rank_states in states:
        found: dict[str, tuple[ZeroState, str]] = {}
        for state in rank_states:
            for name in state.fp32:
                serial = serial_name(name)
                if serial is not None and serial not in found:
                    found[serial] = (state, name)
        per_rank.append(found)
    masters, param_state = {}, {}
    for serial in per_rank[0]:
        shards = [found[serial] for found in per_rank]
        masters[serial] = merge_tensor(serial, [state.fp32[name] for state, name in shards])
        param_state[serial] = {key: merge_tensor(serial, [state.moments[name][key] for state, name in shards])
                               for key in MOMENTS}
        param_state[serial]["step"] = shards[0][0].step
    return {"param_state": param_state, "masters": masters, "param_groups": states[0][0].param_groups,
            "wrapper": None}


def _from_shards(shards: list[dict[str, Any]], models: list[StateDict], kind: str) -> Checkpoint:
    config = dict(shards[0].get("model_config", {}))
    if config.get("model_parallel_size", len(shards)) != len(shards):
        raise ConfigError(f"model_config says model_parallel_size {config['model_parallel_size']} but "
                          f"{len(shards)} model-parallel files were found: the checkpoint is incomplete")
    model = {name: tensor.float() for name, tensor in merge_state_dicts(models).items()}
    scheduler = shards[0].get("lr_scheduler")
    return Checkpoint(model=model, model_config=config, iteration=int(shards[0].get("iteration", 0)),
                      consumed_samples=int(shards[0].get("consumed_samples", 0)), kind=kind,
                      lr_scheduler=scheduler,
                      rng_states=[s["rng_states"] for s in shards if "rng_states" in s] or None)


def pipeline_layer_name(layer: int, num_layers: int, name: str) -> str | None:
    """Our serial name of parameter ``name`` of pipeline block ``layer`` (see model/gpt2_pipe.py):
    0 the embedding, 1..L the transformer layers, L + 1 the final LayerNorm; the tied output copy
    (L + 2) saves no file of its own."""
    if layer == 0:
        return name
    if layer <= num_layers:
        return f"transformer.layers.{layer - 1}.{name}"
    if layer == num_layers + 1:
        return f"transformer.final_layernorm.{name}"
    return None


def _read_pipeline_checkpoint(directory: str) -> Checkpoint:
    """A DeepSpeed pipeline checkpoint: weights in per-block, per-tensor-rank files; the client
    state of stage 0's tensor ranks in ``mp_rank_XX_model_states.pt`` (DeepSpeed numbers the
    stage-major ranks, so stage 0 holds the first ``model_parallel_size``)."""
    first = _read_deepspeed_file(directory, 0)
    config = first.get("model_config", {})
    mp_size, num_layers = int(config.get("model_parallel_size", 1)), int(config.get("num_layers", 0))
    shards = [first] + [_read_deepspeed_file(directory, rank) for rank in range(1, mp_size)]
    models: list[StateDict] = [{} for _ in range(mp_size)]
    for path in sorted(glob.glob(os.path.join(directory, "layer_*-model_*-model_states.pt"))):
        match = re.search(r"layer_(\d+)-model_(\d+)-model_states\.pt$", path)
        layer, rank = int(match.group(1)), int(match.group(2))
        weights = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's file: trusted input
        for name, tensor in weights.items():
            ours = pipeline_layer_name(layer, num_layers, name)
            if ours is not None:
                models[rank][ours] = tensor
    checkpoint = _from_shards(shards, models, "deepspeed")
    checkpoint.notes.append("DeepSpeed pipeline checkpoint: optimizer state not converted")
    return checkpoint


def _read_deepspeed_file(directory: str, mp_rank: int) -> dict[str, Any]:
    """DeepSpeed's model-states file of ``mp_rank`` (trusted input: ``weights_only=False``)."""
    candidates = sorted(glob.glob(os.path.join(directory, f"*mp_rank_{mp_rank:02d}_model_states.pt")))
    try:
        return torch.load(candidates[0], map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ConfigError(f"DeepSpeed file {candidates[0]} cannot be read ({type(error).__name__}); "
                          "it is corrupt or incomplete") from None


def _deepspeed_module(directory: str, mp_rank: int, shard: dict[str, Any], stage: int) -> StateDict:
    """The module weights of one model-parallel rank.

    ZeRO 0-2 store them whole in ``module`` (in the training dtype). ZeRO 3 stores empty
    placeholders there: the fp32 weights are rebuilt from the rank's ZeRO partitions with
    DeepSpeed's ``zero_to_fp32`` (run on a view of this rank's files only).
    """
    if stage < 3:
        return dict(shard["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = glob.glob(os.path.join(directory, f"*_mp_rank_{mp_rank:02d}_*_states.pt"))
    with tempfile.TemporaryDirectory() as view:
        os.mkdir(os.path.join(view, "tag"))
        for path in files:
            os.symlink(os.path.abspath(path), os.path.join(view, "tag", os.path.basename(path).replace(
                f"mp_rank_{mp_rank:02d}", "mp_rank_00")))
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report is not ours to print
            state = get_fp32_state_dict_from_zero_checkpoint(view, tag="tag")
    return {name: state[name].detach() for name in shard["module"]}


def merge_optimizer(shards: list[dict[str, Any]], models: list[StateDict]) -> dict[str, Any]:
    """Megatron-path optimizer state (torch AdamW, optionally wrapped by FP16_Optimizer) -> serial."""
    names = optimizer_param_names(list(models[0]))
    wrapped = [s.get("optimizer_state_dict", s) for s in shards]
    indices = [i for group in wrapped[0]["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise ConfigError(f"optimizer holds {len(indices)} parameters, the model {len(names)}: "
                          "not a GPT-2 checkpoint of this codebase")
    param_state = {}
    for index, name in zip(indices, names):
        per_rank = [w["state"].get(index, {}) for w in wrapped]
        param_state[name] = {key: _merge_value(name, key, [state[key] for state in per_rank], models)
                             for key in per_rank[0]}
    masters = None
    if "fp32_from_fp16" in shards[0]:
        masters = {name: merge_tensor(name, [s["fp32_from_fp16"][i] for s in shards])
                   for i, name in enumerate(names)}
    rest = {key: value for key, value in shards[0].items() if key not in ("optimizer_state_dict", "fp32_from_fp16")}
    return {"param_state": param_state, "masters": masters, "param_groups": wrapped[0]["param_groups"],
            "wrapper": rest if "optimizer_state_dict" in shards[0] else None}


def _merge_value(name: str, key: str, values: list[Any], models: list[StateDict]) -> Any:
    """Tensors shaped like the parameter shard are merged like it; scalars (step) come from rank 0."""
    if isinstance(values[0], torch.Tensor) and values[0].shape == models[0][name].shape and values[0].dim():
        return merge_tensor(name, values)
    return values[0]


def split_optimizer(serial: dict[str, Any], mp_size: int, model: StateDict) -> list[dict[str, Any]]:
    """Inverse of ``merge_optimizer`` for ``mp_size`` ranks (indices in the optimizer's order)."""
    names = optimizer_param_names(list(model))
    states: list[dict[int, dict[str, Any]]] = [{} for _ in range(mp_size)]
    for index, name in enumerate(names):
        for key, value in serial["param_state"][name].items():
            shaped = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == model[name].shape
            parts = split_tensor(name, value, mp_size) if shaped else [value] * mp_size
            for rank in range(mp_size):
                states[rank].setdefault(index, {})[key] = parts[rank]
    result = []
    for rank in range(mp_size):
        wrapped = {"state": states[rank], "param_groups": serial["param_groups"]}
        if serial["wrapper"] is None:
            result.append(wrapped)
            continue
        masters = [split_tensor(name, serial["masters"][name], mp_size)[rank] for name in names]
        result.append({**serial["wrapper"], "optimizer_state_dict": wrapped, "fp32_from_fp16": masters})
    return result


def repad_checkpoint(checkpoint: Checkpoint, padded_vocab_size: int, vocab_size: int) -> None:
    """Cut or zero-fill the vocabulary rows (weights, optimizer state, masters) in place.

    Rows below ``vocab_size`` are real tokens and are never cut.
    """
    if padded_vocab_size < vocab_size:
        raise ConfigError(f"padded vocabulary {padded_vocab_size} is smaller than the vocabulary {vocab_size}")
    name = "word_embeddings.weight"
    checkpoint.model[name] = repad_vocab(checkpoint.model[name], padded_vocab_size)
    if checkpoint.optimizer is not None:
        for key, value in checkpoint.optimizer["param_state"][name].items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                checkpoint.optimizer["param_state"][name][key] = repad_vocab(value, padded_vocab_size)
        if checkpoint.optimizer["masters"] is not None:
            masters = checkpoint.optimizer["masters"]
            masters[name] = repad_vocab(masters[name], padded_vocab_size)
    checkpoint.model_config["padded_vocab_size"] = padded_vocab_size


def resharded_rng_states(states: list[dict[str, Any]], mp_size: int, seed: int) -> list[dict[str, Any]]:
    """RNG states for ``mp_size`` ranks from those of the source ranks.

    Python, NumPy, torch and CUDA states are the same on every model-parallel rank and are kept.
    The model-parallel tracker (attention dropout) is per rank and cannot be split: at an
    unchanged size each rank keeps its own; otherwise every rank is re-seeded as a fresh run
    would be, with ``seed + 2718 + mp_rank``.
    """
    if len(states) == mp_size:
        return states
    result = []
    for rank in range(mp_size):
        state = dict(states[0])
        tracker = {}
        for name, old in states[0].get("rng_tracker_states", {}).items():
            tracker[name] = _seeded_generator_state(seed + 2718 + rank, old)
        state["rng_tracker_states"] = tracker
        result.append(state)
    return result


def _seeded_generator_state(seed: int, like: torch.Tensor) -> torch.Tensor:
    """A generator state for ``seed`` in the format of ``like`` (CPU Mersenne or CUDA Philox)."""
    cpu_state = torch.Generator().manual_seed(seed).get_state()
    if like.numel() == cpu_state.numel():
        return cpu_state
    return torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8).clone()  # Philox: seed, offset


def _write_megatron_files(checkpoint: Checkpoint, save: str, tag: str, mp_size: int, seed: int) -> None:
    """Each model-parallel rank's ``model_optim_rng.pt`` of ``checkpoint`` under ``save/tag``."""
    models = split_state_dict(checkpoint.model, mp_size)
    optimizers = (split_optimizer(checkpoint.optimizer, mp_size, checkpoint.model)
                  if checkpoint.optimizer is not None else None)
    rng = resharded_rng_states(checkpoint.rng_states, mp_size, seed) if checkpoint.rng_states else None
    config = dict(checkpoint.model_config, model_parallel_size=mp_size)
    for rank in range(mp_size):
        state: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": checkpoint.iteration,
                                 "consumed_samples": checkpoint.consumed_samples, "model_config": config,
                                 "model": models[rank]}
        if rng is not None:
            state["rng_states"] = rng[rank]
        if optimizers is not None:
            state["optimizer"] = optimizers[rank]
        if checkpoint.lr_scheduler is not None:
            state["lr_scheduler"] = checkpoint.lr_scheduler
        save_torch_file(state, megatron_checkpoint_name(save, tag, rank))


def write_megatron_checkpoint(checkpoint: Checkpoint, save: str, mp_size: int, seed: int = 1234) -> str:
    """Write ``checkpoint`` in the Megatron layout for ``mp_size`` ranks; returns its directory.

    Follows ``megatron.checkpoint.protocol``'s protocol: staged under ``iter_X.tmp``, its manifest
    (the ``complete`` marker with every file's SHA-256) written, renamed, then named by the
    tracker file. The caller holds the directory's writer lock and has checked that ``save``
    holds no other run's checkpoints (``tools/convert_checkpoint.py`` does both).
    """
    tag = checkpoint_tag(checkpoint.iteration)
    staging = os.path.join(save, tag + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_megatron_files(checkpoint, save, tag + ".tmp", mp_size, seed)
        digests = {name: file_digest(os.path.join(staging, name)) for name in checkpoint_files(staging)}
        write_text_atomic(os.path.join(staging, COMPLETE_MARKER), manifest_text(checkpoint.iteration, digests))
        final = os.path.join(save, tag)
        shutil.rmtree(final, ignore_errors=True)  # the caller checked it is not a complete checkpoint
        os.replace(staging, final)
        write_text_atomic(os.path.join(save, TRACKER_FILENAME), f"{checkpoint.iteration}\n")
    except (OSError, RuntimeError) as error:
        failure = write_failure(error, save)
        if failure is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainingAborted(f"the checkpoint could not be written to {save}: {failure}; nothing was kept: free "
                              "space (or fix the directory) and run the command again") from None
    return final
