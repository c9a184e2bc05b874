"""The DeepSpeed training path: ``deepspeed.initialize`` with our model, optimizer (or the
config's) and learning-rate schedule; engine backward and step; DeepSpeed's checkpoint files.

The engine owns data-parallel gradient averaging, precision, loss scaling, ZeRO, clipping and
its checkpoint files; this class adapts it to the ``Backend`` protocol. The configuration it
gets is already resolved (``megatron.config.RunConfig.deepspeed``). Only this module, the
pipeline backend, ``arguments.py`` (DeepSpeed's flags) and the offline reader of ZeRO 3
checkpoints (``megatron.checkpoint.convert``) import deepspeed.
"""

from __future__ import annotations

import collections.abc
import difflib
import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from megatron import mpu
from megatron.backends.base import (
    ForwardStep,
    StateCheck,
    StepResult,
    average_over_data_parallel,
    build_lr_scheduler,
    build_optimizer,
    maybe_compile,
    precision_mismatch,
)
from megatron.backends.deepspeed_universal import deepspeed_converter, load_resharded
from megatron.checkpoint.async_save import FileSink
from megatron.checkpoint.layout import Topology
from megatron.checkpoint.reshard import (
    DEEPSPEED_UNIVERSAL,
    NATIVE,
    plan_resume,
    saved_topology,
    universal_copy_converter,
)
from megatron.checkpoint.zero_state import trusted_load
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted
from megatron.model import (
    ActivationCheckpointing,
    default_activation_checkpointing,
    use_activation_checkpointing,
)
from megatron.model.gpt2_modeling import gpt2_get_params_for_weight_decay_optimization


class _SinkCheckpointEngine:
    """DeepSpeed's checkpoint engine with its ``save`` going to ``sink`` (the rest, loading
    included, is the engine's own). DeepSpeed clones a state for ``torch.save`` only when the
    engine preserves storage sharing; the sink copies every tensor anyway, so it does not."""

    def __init__(self, engine: Any, sink: FileSink) -> None:
        self._engine, self._sink = engine, sink
        self._zipfile = bool(getattr(engine, "zipfile_serialization", True))

    def save(self, state_dict: Any, path: str) -> None:
        self._sink.save(state_dict, path, self._zipfile)

    def preserves_storage_sharing(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _RecordingDict(dict):
    """A config dict that records every key asked of it: DeepSpeed's config classes ask for
    each top-level key they know (``get``, ``in``, ``[]``), so a key never asked for is one
    DeepSpeed would silently ignore."""

    def __init__(self, *args: Any, seen: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set() if seen is None else seen

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def keys(self) -> collections.abc.KeysView:  # type: ignore[override]
        return collections.abc.KeysView(self)  # membership tests go through __contains__

    def __copy__(self) -> _RecordingDict:
        return _RecordingDict(self, seen=self.seen)


# Top-level keys DeepSpeed reads outside its config classes.
_KEYS_READ_ELSEWHERE = {"sequence_parallel_size"}


def check_deepspeed_config(config: dict[str, Any], path: str) -> None:
    """Validate a resolved DeepSpeed config with DeepSpeed's own config classes (types, ranges,
    unknown nested keys) and reject unknown top-level keys, at start-up: DeepSpeed itself would
    ignore a misspelt key and report the others only after the model is built. Raises ConfigError."""
    from deepspeed.runtime.config import DeepSpeedConfig

    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    # Checked here without a process group, i.e. for one data-parallel rank.
    recording = _RecordingDict(config, train_batch_size=micro * accumulation)
    try:
        DeepSpeedConfig(recording)
    except Exception as error:  # noqa: BLE001 - pydantic, assertion and value errors all mean a bad config
        lines = [line.strip() for line in str(error).splitlines()
                 if line.strip() and not line.strip().startswith("For further information")]
        detail = "; ".join(lines[:4]) or type(error).__name__
        raise ConfigError(f"DeepSpeed config {path} is not valid: {detail}") from None
    check_offload_optimizer(config, path)
    known = recording.seen | _KEYS_READ_ELSEWHERE
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(k for k in known if isinstance(k, str)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"DeepSpeed config {path}: unknown key {key!r}{hint}; DeepSpeed would ignore it "
                              "silently: fix or remove it")


def check_offload_optimizer(config: dict[str, Any], path: str) -> None:
    """ZeRO-Offload runs DeepSpeed's own CPU Adam: DeepSpeed refuses our (client) optimizer there
    unless ``zero_force_ds_cpu_optimizer`` is false, and only once the model is built."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    device = offload.get("device") if isinstance(offload, dict) else None
    if device in ("cpu", "nvme") and "optimizer" not in config and config.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(f"DeepSpeed config {path} offloads the optimizer to {device} but defines no \"optimizer\": "
                          "ZeRO-Offload needs DeepSpeed's CPU Adam; add an \"optimizer\" section (AdamW, as in "
                          "scripts/ds_zero2_offload_config.json)")


def init_deepspeed_comm() -> None:
    """Let DeepSpeed wrap the existing process group (before anything of it communicates)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def activation_checkpointing(run: RunConfig) -> ActivationCheckpointing:
    """The checkpoint function and RNG tracker the model is handed: ``mpu``'s, or with
    ``--deepspeed-activation-checkpointing`` DeepSpeed's (partitioned, contiguous or CPU
    checkpoints), seeded as ``mpu.model_parallel_cuda_manual_seed`` seeds its own."""
    if not run.deepspeed.activation_checkpointing:
        return default_activation_checkpointing()
    import deepspeed

    settings = run.deepspeed
    init_deepspeed_comm()
    deepspeed.checkpointing.configure(
        mpu, deepspeed_config=None, partition_activations=settings.partition_activations,
        contiguous_checkpointing=settings.contiguous_checkpointing, num_checkpoints=run.model.num_layers,
        checkpoint_in_cpu=settings.checkpoint_in_cpu, synchronize=settings.synchronize_each_layer,
        profile=settings.profile_backward)
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(run.training.seed)
    return ActivationCheckpointing(deepspeed.checkpointing.checkpoint, deepspeed.checkpointing.get_cuda_rng_tracker())


def initialize_engine(model: nn.Module, run: RunConfig, model_parallel_unit: Any) -> tuple[Any, Any, Any]:
    """``deepspeed.initialize``: returns (engine, its optimizer, its learning-rate scheduler).

    The optimizer is ours (fused AdamW) unless the DeepSpeed config defines one; the schedule is
    always ours (``AnnealingLR``, driving whichever optimizer the engine ends up with).
    """
    import deepspeed

    maybe_compile(model, run)
    param_groups = gpt2_get_params_for_weight_decay_optimization(model)
    if run.deepspeed.defines_optimizer:
        optimizer, model_parameters = None, param_groups
    else:
        optimizer, model_parameters = build_optimizer(param_groups, run), None
    engine, engine_optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model_parameters, args=None,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, run), mpu=model_parallel_unit,
        dist_init_required=False, config=run.deepspeed.engine_config())
    check_async_save(engine, run)
    return engine, engine_optimizer, lr_scheduler


def check_async_save(engine: Any, run: RunConfig) -> None:
    """``--async-save`` writes the engine's files itself: only in place of DeepSpeed's own
    ``torch.save`` engine, not of a writer the config's ``checkpoint`` section chose."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    own = engine.checkpoint_engine
    if run.checkpoint.async_save and not isinstance(own, TorchCheckpointEngine):
        raise ConfigError(f"--async-save writes checkpoints in the background itself, but the DeepSpeed config "
                          f"{run.deepspeed.config_path} selects DeepSpeed's {type(own).__name__}: drop --async-save "
                          "or the config's checkpoint writer (\"checkpoint\": {\"writer\": ...} or \"datastates\")")


def step_result(engine: Any, loss: torch.Tensor) -> StepResult:
    """The outcome of an engine step (the engine decides skips on the host)."""
    applied = engine.was_step_applied()
    norm = engine.get_global_grad_norm()
    return StepResult.from_host(loss, not applied, float(norm) if norm is not None and applied else None)


class DeepSpeedEngineBackend:
    """What the DeepSpeed and pipeline backends share: everything but the step and the model."""

    name = "deepspeed"
    writes_deepspeed_latest = True
    run: RunConfig
    model: Any  # the DeepSpeed engine

    def loss_scale(self) -> float:
        if not self.run.precision.fp16:
            return 1.0
        optimizer = self.model.optimizer
        scale = getattr(optimizer, "cur_scale", None)  # the attribute depends on the ZeRO stage
        return float(scale if scale is not None else getattr(optimizer, "loss_scale", 1.0))

    def learning_rate(self) -> float:
        return float(self.model.get_lr()[0])

    def parameters(self) -> list[torch.Tensor]:
        """This rank's share of the weights (ZeRO 3 partitions included)."""
        return [getattr(p, "ds_tensor", p) for p in self.model.module.parameters()]

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def save_state(self, root: str, tag: str, client_state: dict[str, Any], sink: FileSink | None = None) -> None:
        """Every rank calls the engine's ``save_checkpoint`` (ZeRO shards are per rank); with
        ``sink``, the engine's files go there instead of to disk."""
        engine = self.model
        if sink is None:
            engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
            return
        own = engine.checkpoint_engine
        engine.checkpoint_engine = _SinkCheckpointEngine(own, sink)
        try:
            engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        finally:
            engine.checkpoint_engine = own

    def load_state(self, root: str, tag: str, load_optimizer: bool, validate: StateCheck) -> dict[str, Any]:
        """The engine reads and applies in one call, so ``validate`` runs right after it."""
        directory = os.path.join(root, tag)
        current = Topology.of(self.run, self.name)
        saved = saved_topology(directory, current)
        plan = plan_resume(saved, current, directory)
        if plan != NATIVE:
            if plan == DEEPSPEED_UNIVERSAL:
                convert = deepspeed_converter(directory, current.zero_stage, validate)
                how = "DeepSpeed's universal checkpoint"
            else:
                convert = universal_copy_converter(directory, self.run, current, load_optimizer, validate)
                how = "a universal copy (one folder per parameter)"
            _, state = self._load_checked(directory, lambda: load_resharded(
                self.model, self.run, root, tag, load_optimizer, saved, convert, how))
            validate(state)
            return state
        model_file = self.model._get_ckpt_name(root, tag)  # this rank's file, whatever the mode
        if not os.path.isfile(model_file):
            if os.path.isdir(os.path.join(directory, "mp_rank_00")):
                raise ConfigError(f"{directory} is a Megatron (non-DeepSpeed) checkpoint: drop --deepspeed to "
                                  "load it, or convert it with tools/convert_checkpoint.py")
            raise ConfigError(f"{model_file} is missing: the checkpoint was saved with another "
                              "--model-parallel-size or is incomplete")
        dtype = self.run.precision.dtype
        if load_optimizer:  # the weights alone load at any precision
            check_saved_bf16(directory, dtype)
        _, state = self._load_checked(directory, lambda: self.model.load_checkpoint(
            root, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer),
            lambda: check_saved_stage0_precision(directory, dtype))
        validate(state)
        return state

    @staticmethod
    def _load_checked(directory: str, load: Callable[[], tuple[str | None, dict[str, Any]]],
                      explain: Callable[[], None] | None = None) -> tuple[str, dict[str, Any]]:
        """``load()``'s result; a failure to read is a ConfigError naming ``directory`` (or the one
        ``explain`` raises when it recognises the cause)."""
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        try:
            path, state = load()
        except (ConfigError, TrainingAborted):
            raise
        except (RuntimeError, OSError, KeyError, EOFError, AssertionError, ZeRORuntimeException) as error:
            if explain is not None:
                explain()
            raise ConfigError(f"DeepSpeed checkpoint {directory} cannot be loaded ({type(error).__name__}: "
                              f"{str(error)[:300]}); it is corrupt or from another model/ZeRO setup") from None
        if path is None:
            raise ConfigError(f"DeepSpeed could not load {directory}")
        return path, state


def check_saved_bf16(directory: str, dtype: str) -> None:
    """ConfigError when ``directory`` was saved in bf16 and this run is not, or the reverse, at
    ZeRO stage 1-3: DeepSpeed names a bf16 run's optimizer files ``bf16_zero_pp_rank_*`` and
    others ``zero_pp_rank_*``, and would fail on a missing file."""
    bf16 = glob.glob(os.path.join(directory, "bf16_zero_pp_rank_*_optim_states.pt"))
    other = glob.glob(os.path.join(directory, "zero_pp_rank_*_optim_states.pt"))
    saved = "bf16" if bf16 and not other else "fp32 or fp16" if other and not bf16 else None
    if saved is not None and (saved == "bf16") != (dtype == "bf16"):
        raise precision_mismatch(f"DeepSpeed checkpoint {directory}", saved, dtype)


def check_saved_stage0_precision(directory: str, dtype: str) -> None:
    """After a failed load: ConfigError when ``directory`` is a ZeRO stage 0 checkpoint whose
    optimizer state (whole, in the model-states file) is of the other kind than this run's: the
    torch optimizer's own in fp32, DeepSpeed's FP16_Optimizer (fp32 masters) in fp16 and bf16."""
    path = os.path.join(directory, "mp_rank_00_model_states.pt")
    try:
        optimizer = trusted_load(path).get("optimizer")
    except Exception:  # noqa: BLE001 - unreadable: the caller's own error says so
        return
    if not isinstance(optimizer, dict) or not ({"param_groups", "optimizer_state_dict"} & set(optimizer)):
        return
    saved_half = "optimizer_state_dict" in optimizer
    if saved_half != (dtype != "fp32"):
        raise precision_mismatch(f"DeepSpeed checkpoint {directory}", "fp16 or bf16" if saved_half else "fp32",
                                 dtype)


class DeepSpeedBackend(DeepSpeedEngineBackend):
    """The engine runs each micro batch's backward and step; it steps the optimizer at the
    accumulation boundary given in its config."""

    def __init__(self, model: nn.Module, run: RunConfig, forward_step: ForwardStep) -> None:
        self.run = run
        self.forward_step = forward_step
        functions = activation_checkpointing(run)
        use_activation_checkpointing(model, functions)
        self.rng_tracker = functions.rng_tracker
        self.unwrapped_model = model
        self.model, self.optimizer, self.lr_scheduler = initialize_engine(model, run, mpu)

    def train_step(self, data_iterator: Iterator | None) -> StepResult:
        num_micro_batches = self.run.training.gradient_accumulation_steps
        total = torch.zeros((), device=self.run.device)
        for _ in range(num_micro_batches):
            loss = self.forward_step(data_iterator, self.model, self.run)
            self.model.backward(loss)
            self.model.step()
            total += loss.detach().float()
        return step_result(self.model, average_over_data_parallel(total / num_micro_batches))

    def eval_loss(self, data_iterator: Iterator | None) -> torch.Tensor:
        return self.forward_step(data_iterator, self.model, self.run)
