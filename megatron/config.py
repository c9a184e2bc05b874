"""The configuration of a run: frozen, typed sections built once at start-up.

``arguments.build_run_config`` turns Megatron's flags, the launch environment, the tokenizer and
the DeepSpeed JSON into one ``RunConfig`` before any process group or model exists. Every
derived value (data-parallel size, device, padded vocabulary, DeepSpeed batch sizes and
precision, decay iterations) is worked out there, so no module depends on another having run
first, and nothing writes configuration afterwards.

The pure derivations that need more than one section live here too: the DeepSpeed batch-size
and precision rules (``resolve_deepspeed_batch``, ``resolve_deepspeed_precision``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron.data.config import DataConfig
from megatron.errors import ConfigError
from megatron.launch import LaunchEnv
from megatron.model.config import ModelConfig

PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ParallelConfig:
    """This process's place in the run: launcher values and the tensor x pipe x data layout."""

    rank: int
    world_size: int
    local_rank: int
    model_parallel_size: int = 1  # tensor model parallelism (Megatron's --model-parallel-size)
    pipe_parallel_size: int = 1
    pipe_partition_method: str = "parameters"
    distributed_backend: str = "gloo"  # resolved: nccl with GPUs, else gloo
    distributed_timeout_minutes: float = 10.0
    master_addr: str = "127.0.0.1"
    master_port: str = "6000"
    device: torch.device = torch.device("cpu")
    restart_count: int = 0  # which attempt of an elastic (torchrun --max-restarts) job this is
    max_restarts: int = 0

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.model_parallel_size * self.pipe_parallel_size)


@dataclass(frozen=True)
class PrecisionConfig:
    """Training precision (after merging the flags with a DeepSpeed config) and loss scaling."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16
    loss_scale: float | None = None  # static scale; None: dynamic
    initial_loss_scale: float = 2.0**32
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    fp32_allreduce: bool = False

    @property
    def fp16(self) -> bool:
        return self.dtype == "fp16"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, the learning-rate schedule and gradient clipping."""

    lr: float = 1.5e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int = 1000  # resolved: --lr-decay-iters, else --train-iters
    warmup: float = 0.01  # fraction of lr_decay_iters
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0: off

    @property
    def warmup_iters(self) -> int:
        return int(self.warmup * self.lr_decay_iters)


@dataclass(frozen=True)
class TrainingConfig:
    """Batches, iterations, evaluation, GPT-2's batch options and the exit conditions."""

    micro_batch_size: int = 4  # --batch-size: per data-parallel rank
    gradient_accumulation_steps: int = 1  # resolved: flag, DeepSpeed config, or 1
    train_iters: int = 1000
    eval_batch_size: int = 4  # resolved: --eval-batch-size, else --batch-size
    eval_iters: int = 100
    eval_interval: int = 1000
    seed: int = 1234
    compile: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    max_skipped_steps: int = 5
    exit_signal_handler: bool = False
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    progress_timeout_minutes: float = 5.0  # a rank without progress this long ends the job (0: never)
    keep_host_memory: bool = True  # CPU runs: glibc keeps freed memory (megatron.host_memory); not --release-host-memory


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 100
    log_timers: bool = False
    tensorboard_dir: str | None = None  # None: <exp_dir>/tb
    tensorboard: bool = True  # not --no-tensorboard
    wandb_project: str | None = None  # log the same scalars to Weights & Biases
    wandb_dir: str | None = None  # None: the experiment directory
    wandb_run_name: str | None = None
    exp_dir: str | None = None  # None: experiments/<timestamp>
    peak_tflops: float | None = None  # None: GPU table, or a matmul measured on CPU


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int = 5000
    save_interval_minutes: float | None = None  # also save when this much time passed since the last save
    keep_last_n: int | None = None
    save_optim: bool = True  # not --no-save-optim
    save_rng: bool = True  # not --no-save-rng
    load_optim: bool = True  # not --no-load-optim
    load_rng: bool = True  # not --no-load-rng
    finetune: bool = False  # weights only; iteration 0, fresh optimizer and RNG
    override_tokenizer_check: bool = False  # load a checkpoint trained with other tokenizer files
    async_save: bool = False  # complete checkpoints in the background (megatron.checkpoint.async_save)


@dataclass(frozen=True)
class DeepSpeedConfig:
    """``--deepspeed`` and its JSON, resolved against the flags (batch sizes, precision, clipping).

    The JSON is kept as text so the section is truly immutable; ``engine_config()`` hands out a
    fresh dict for ``deepspeed.initialize`` (which may modify what it is given).
    """

    enabled: bool = False
    config_path: str | None = None
    config_json: str = "{}"
    activation_checkpointing: bool = False
    partition_activations: bool = False
    contiguous_checkpointing: bool = False
    checkpoint_in_cpu: bool = False
    synchronize_each_layer: bool = False
    profile_backward: bool = False

    def engine_config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def zero_stage(self) -> int:
        return int(self.engine_config().get("zero_optimization", {}).get("stage", 0))

    @property
    def defines_optimizer(self) -> bool:
        return "optimizer" in self.engine_config()


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is configured with, derived values included."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    deepspeed: DeepSpeedConfig
    eod_token: int
    tokenizer_sha256: str = ""  # megatron.tokenizer.tokenizer_fingerprint of the run's tokenizer files
    flags_json: str = "{}"  # every parsed flag as given (entry-point flags too), for the experiment record

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, over all data-parallel ranks."""
        training = self.training
        return training.micro_batch_size * training.gradient_accumulation_steps * self.parallel.data_parallel_size

    @property
    def backend_name(self) -> str:
        if self.parallel.pipe_parallel_size > 1:
            return "deepspeed-pipeline"
        return "deepspeed" if self.deepspeed.enabled else "megatron"


def build_parallel_config(launch: LaunchEnv, model_parallel_size: int, pipe_parallel_size: int = 1,
                          distributed_backend: str | None = None, distributed_timeout_minutes: float = 10.0,
                          pipe_partition_method: str = "parameters") -> ParallelConfig:
    """The launcher's values and the layout; the world must split into whole model replicas.

    ``distributed_backend`` None picks nccl with GPUs, else gloo; the device follows it.
    """
    per_replica = model_parallel_size * pipe_parallel_size
    if launch.world_size % per_replica:
        pipe = f" x --pipe-parallel-size ({pipe_parallel_size})" if pipe_parallel_size > 1 else ""
        raise ConfigError(f"world size ({launch.world_size}) is not divisible by --model-parallel-size "
                          f"({model_parallel_size}){pipe}; launch a multiple of {per_replica} processes")
    backend = distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")
    device = (torch.device("cuda", launch.local_rank % torch.cuda.device_count()) if backend == "nccl"
              else torch.device("cpu"))
    return ParallelConfig(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
        model_parallel_size=model_parallel_size, pipe_parallel_size=pipe_parallel_size,
        pipe_partition_method=pipe_partition_method, distributed_backend=backend,
        distributed_timeout_minutes=distributed_timeout_minutes, master_addr=launch.master_addr,
        master_port=launch.master_port, device=device, restart_count=launch.restart_count,
        max_restarts=launch.max_restarts)


def resolve_deepspeed_batch(config: dict[str, Any], micro: int, data_parallel: int,
                            accumulation: int | None, global_batch: int | None = None) -> int:
    """Derive micro batch, accumulation and global batch from each other; contradictions fail.

    ``micro`` is ``--batch-size`` (per data-parallel rank), ``accumulation`` the flag's or the one
    ``--global-batch-size`` (``global_batch``) implies (None: neither given). Fills the three batch
    keys of ``config``; returns the gradient accumulation steps.
    """
    config_micro = config.get("train_micro_batch_size_per_gpu")
    config_total = config.get("train_batch_size")
    config_accum = config.get("gradient_accumulation_steps")
    requested = (f"--global-batch-size {global_batch} (gradient accumulation {accumulation})" if global_batch
                 else f"--gradient-accumulation-steps {accumulation}")
    numbers = (f"--batch-size {micro}, data-parallel size {data_parallel}, {requested}; config train_batch_size "
               f"{config_total}, train_micro_batch_size_per_gpu {config_micro}, gradient_accumulation_steps "
               f"{config_accum}")
    if config_micro is not None and config_micro != micro:
        raise ConfigError(f"batch sizes disagree ({numbers}): the config's micro batch must equal --batch-size; "
                          "drop train_micro_batch_size_per_gpu from the config or fix --batch-size")
    if accumulation is not None and config_accum is not None and accumulation != config_accum:
        fix = ("drop gradient_accumulation_steps and train_batch_size from the config (--global-batch-size "
               "sets them)" if global_batch else "make them agree, or drop one")
        raise ConfigError(f"batch sizes disagree ({numbers}): gradient accumulation differs; {fix}")
    accum = accumulation or config_accum
    if accum is None:
        accum = config_total // (micro * data_parallel) if config_total else 1
    if config_total is not None and config_total != micro * accum * data_parallel:
        raise ConfigError(f"batch sizes disagree ({numbers}): train_batch_size must equal --batch-size x "
                          f"gradient accumulation x data-parallel size = {micro} x {accum} x {data_parallel} = "
                          f"{micro * accum * data_parallel}; fix the config or the flags")
    config.update(train_batch_size=micro * accum * data_parallel, train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=accum)
    return accum


def resolve_deepspeed_precision(config: dict[str, Any], flags: PrecisionConfig, have_gpu: bool) -> str:
    """Make the flags (``flags.dtype``) and the config's fp16/bf16 sections agree; returns the
    precision. A contradiction fails; a section the flags ask for is added to ``config``."""
    config_fp16 = bool(config.get("fp16", {}).get("enabled", False))
    config_bf16 = bool(config.get("bf16", config.get("bfloat16", {})).get("enabled", False))
    for flag, on_flag, on_config, name in (("--fp16", flags.fp16, config_fp16, "fp16"),
                                           ("--bf16", flags.bf16, config_bf16, "bf16")):
        if on_flag and not on_config and name in config:
            raise ConfigError(f"{flag} is given but the DeepSpeed config disables {name}; make them agree")
    fp16, bf16 = flags.fp16 or config_fp16, flags.bf16 or config_bf16
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled (flags or DeepSpeed config); pick one")
    if fp16 and not have_gpu:
        raise ConfigError("DeepSpeed's fp16 needs a GPU; on CPU use --bf16 (or a bf16 config)")
    if fp16 and "fp16" not in config:
        config["fp16"] = {"enabled": True, "loss_scale": flags.loss_scale or 0,
                          "initial_scale_power": int(math.log2(flags.initial_loss_scale)),
                          "loss_scale_window": flags.loss_scale_window, "hysteresis": flags.hysteresis,
                          "min_loss_scale": flags.min_scale}
    if bf16 and "bf16" not in config and "bfloat16" not in config:
        config["bf16"] = {"enabled": True}
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"
