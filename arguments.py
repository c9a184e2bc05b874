"""Megatron-LM's command-line flags, grouped as in the original, plus DeepSpeed's, and the
``RunConfig`` they build.

``get_args()`` parses and checks the flags; ``build_run_config(args, tokenizer)`` then derives
everything else (launch environment, padded vocabulary, DeepSpeed batch sizes and precision)
into frozen, typed sections, before any process group or model exists. Every problem is a
``ConfigError`` naming the value and the fix.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch

from megatron import mpu
from megatron.backends.deepspeed import check_deepspeed_config
from megatron.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainingConfig,
    build_parallel_config,
    resolve_deepspeed_batch,
    resolve_deepspeed_precision,
)
from megatron.data.arguments import add_data_args, data_config, validate_data_args
from megatron.errors import ConfigError
from megatron.launch import LaunchEnv, read_launch_env
from megatron.model.config import ModelConfig
from megatron.tokenizer import tokenizer_fingerprint


def add_model_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("model", "model configuration")
    group.add_argument("--num-layers", type=int, default=24, help="number of transformer layers")
    group.add_argument("--hidden-size", type=int, default=1024, help="transformer hidden size")
    group.add_argument("--num-attention-heads", type=int, default=16, help="number of attention heads")
    group.add_argument("--max-position-embeddings", type=int, default=1024,
                       help="maximum sequence length the position embeddings cover")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="vocabulary size (default: the tokenizer's); padded, see below")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the vocabulary to a multiple of this times --model-parallel-size")
    group.add_argument("--hidden-dropout", type=float, default=0.1,
                       help="dropout on embeddings and on the outputs of attention and MLP")
    group.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on attention probabilities")
    group.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal initialisation")
    group.add_argument("--model-parallel-size", type=int, default=1, help="tensor model-parallel size")
    group.add_argument("--pipe-parallel-size", type=int, default=1,
                       help="pipeline stages (DeepSpeed's pipeline engine; needs --deepspeed)")
    group.add_argument("--pipe-partition-method", default="parameters",
                       help="how layers are split across stages: parameters, uniform, or type:transformer")
    return parser


def add_fp16_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("fp16", "mixed precision")
    group.add_argument("--fp16", action="store_true", help="train in fp16 with fp32 master weights and loss scaling")
    group.add_argument("--bf16", action="store_true", help="train in bf16 with fp32 master weights")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="static loss scale (positive power of 2); default: dynamic loss scaling")
    group.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="initial dynamic loss scale")
    group.add_argument("--loss-scale-window", type=int, default=1000,
                       help="iterations without overflow before the dynamic scale grows")
    group.add_argument("--hysteresis", type=int, default=2, help="overflows tolerated before the scale drops")
    group.add_argument("--min-scale", type=float, default=1.0, help="minimum dynamic loss scale")
    group.add_argument("--fp32-allreduce", action="store_true", help="all-reduce gradients in fp32")
    return parser


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("train", "training configuration")
    group.add_argument("--batch-size", type=int, default=4, help="micro batch size per data-parallel rank")
    group.add_argument("--gradient-accumulation-steps", type=int, default=None,
                       help="micro batches per optimizer step (default 1, or from the DeepSpeed config)")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="samples per optimizer step over all data-parallel ranks; the gradient accumulation "
                            "steps are derived (global / (--batch-size x data-parallel size)), so a run keeps "
                            "its global batch when it resumes on another number of ranks")
    group.add_argument("--train-iters", type=int, default=1000, help="total optimizer steps to train for")
    group.add_argument("--checkpoint-activations", action="store_true", help="recompute activations in backward")
    group.add_argument("--checkpoint-num-layers", type=int, default=1, help="layers per checkpointed chunk")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer layer (inductor: Triton on GPU, C++ on CPU); "
                            "the first steps are slower while it compiles")
    group.add_argument("--release-host-memory", action="store_true",
                       help="CPU runs: let glibc return freed host memory to the system (its default). Without "
                            "it a CPU run keeps freed memory for the next step: no page faults each step "
                            "(ZeRO 1 at the 124M shape: 7%% faster, 11%% more peak memory). GPU runs always "
                            "release")
    group.add_argument("--log-interval", type=int, default=100, help="iterations between log lines")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="peak TFLOP/s per device for the logged MFU (default: GPU table, or a matmul measured on CPU)")
    group.add_argument("--seed", type=int, default=1234, help="random seed")
    group.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate")
    group.add_argument("--min-lr", type=float, default=0.0, help="learning rate floor of the decay")
    group.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "exponential"])
    group.add_argument("--lr-decay-iters", type=int, default=None, help="iterations to decay over (default --train-iters)")
    group.add_argument("--warmup", type=float, default=0.01, help="fraction of --lr-decay-iters spent warming up")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
    group.add_argument("--save", default=None, help="directory to save checkpoints to")
    group.add_argument("--save-interval", type=int, default=5000, help="iterations between checkpoints")
    group.add_argument("--save-interval-minutes", type=float, default=None,
                       help="also checkpoint when this many minutes passed since the last checkpoint (agreed by "
                            "every rank), so a crash loses at most that much work")
    group.add_argument("--async-save", action="store_true",
                       help="training waits only while a checkpoint is copied to host memory; it is written, "
                            "flushed and completed in the background (the next save and the end of the run wait "
                            "for it; needs host memory for one copy of the checkpoint)")
    group.add_argument("--no-save-optim", action="store_true", help="do not save the optimizer state")
    group.add_argument("--no-save-rng", action="store_true", help="do not save the RNG states")
    group.add_argument("--load", default=None, help="directory to load a checkpoint from")
    group.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    group.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    group.add_argument("--finetune", action="store_true",
                       help="load model weights only; start at iteration 0 with fresh optimizer and RNG")
    group.add_argument("--override-tokenizer-check", action="store_true",
                       help="load a checkpoint recorded with other tokenizer files (deliberate vocabulary surgery)")
    group.add_argument("--reset-position-ids", action="store_true", help="restart position ids after each <|endoftext|>")
    group.add_argument("--reset-attention-mask", action="store_true", help="no attention across <|endoftext|>")
    group.add_argument("--eod-mask-loss", action="store_true", help="no loss on the <|endoftext|> token")
    group.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                       help="torch.distributed backend (default: nccl with GPUs, else gloo)")
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launchers")
    group.add_argument("--tensorboard-dir", default=None,
                       help="write TensorBoard scalars here (default: tb/ in the experiment directory)")
    group.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard events")
    group.add_argument("--wandb-project", default=None,
                       help="also log the scalars to this Weights & Biases project (pip install -e '.[wandb]'; "
                            "WANDB_MODE=offline keeps the run on disk)")
    group.add_argument("--wandb-dir", default=None, help="where W&B keeps its run (default: the experiment directory)")
    group.add_argument("--wandb-run-name", default=None, help="the W&B run's name (default: W&B picks one)")
    group.add_argument("--exp-dir", default=None,
                       help="experiment directory for hparams.json, githash.log, gitdiff.log "
                            "(default: experiments/<timestamp>)")
    group.add_argument("--log-timers", action="store_true",
                       help="print per-phase timers (synchronises the device at each phase)")
    group.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                       help="collectives waiting longer than this fail instead of hanging")
    group.add_argument("--progress-timeout-minutes", type=float, default=5.0,
                       help="a rank whose training loop makes no progress (step, checkpoint, evaluation) for this "
                            "long exits with status 1, so that torchrun --max-restarts restarts the job; 0 never")
    group.add_argument("--keep-last-n", type=int, default=None,
                       help="keep only the newest N complete checkpoints (default: keep all)")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM or SIGINT, save a checkpoint and exit cleanly")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="save a checkpoint and exit when the iteration is a multiple of this")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="save a checkpoint and exit after this many minutes of training")
    group.add_argument("--max-skipped-steps", type=int, default=5,
                       help="stop after this many consecutive steps skipped for a non-finite loss or "
                            "gradient norm (bf16/fp32; fp16 overflow is handled by the loss scaler)")
    return parser


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("validation", "validation configuration")
    group.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    group.add_argument("--eval-iters", type=int, default=100, help="batches per validation run")
    group.add_argument("--eval-interval", type=int, default=1000, help="iterations between validation runs")
    return parser


def add_text_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("Text generation", "configurations")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--greedy", action="store_true")
    group.add_argument("--top_p", type=float, default=0.0)
    group.add_argument("--top_k", type=int, default=0)
    group.add_argument("--out-seq-length", type=int, default=256)
    return parser


def add_deepspeed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    import deepspeed

    parser = deepspeed.add_config_arguments(parser)
    group = parser.add_argument_group("DeepSpeed activation checkpointing")
    group.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                       help="use DeepSpeed's activation checkpointing instead of mpu.checkpoint")
    group.add_argument("--partition-activations", action="store_true",
                       help="partition checkpointed activations across model-parallel ranks")
    group.add_argument("--contigious-checkpointing", action="store_true",
                       help="copy checkpointed activations into one contiguous buffer")
    group.add_argument("--checkpoint-in-cpu", action="store_true", help="keep checkpointed activations in CPU memory")
    group.add_argument("--synchronize-each-layer", action="store_true", help="synchronise at each checkpointed layer")
    group.add_argument("--profile-backward", action="store_true", help="time the checkpointed backward")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT-2 pretraining (Megatron-LM with DeepSpeed)",
                                     allow_abbrev=False)
    for add in (add_model_config_args, add_fp16_config_args, add_training_args, add_evaluation_args,
                add_text_generate_args, add_data_args, add_deepspeed_args):
        parser = add(parser)
    return parser


def _require_positive(args: argparse.Namespace, names: list[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:  # nan and inf too
            flag = "--" + name.replace("_", "-")
            finite = " and finite" if value == math.inf else ""
            raise ConfigError(f"{flag} must be positive{finite}, got {value}")


def validate_model_args(args: argparse.Namespace) -> None:
    _require_positive(args, ["num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                             "seq_length", "model_parallel_size", "make_vocab_size_divisible_by",
                             "pipe_parallel_size"])
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
                          f"({args.num_attention_heads})")
    if args.num_attention_heads % args.model_parallel_size:
        raise ConfigError(f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
                          f"--model-parallel-size ({args.model_parallel_size})")
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                          f"({args.max_position_embeddings}); raise the latter or shorten the sequence")
    if args.init_method_std < 0:
        raise ConfigError(f"--init-method-std must be >= 0, got {args.init_method_std}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")


def validate_training_args(args: argparse.Namespace) -> None:
    _require_positive(args, ["batch_size", "train_iters", "lr", "log_interval", "eval_interval",
                             "save_interval", "checkpoint_num_layers", "gradient_accumulation_steps", "global_batch_size",
                             "distributed_timeout_minutes", "lr_decay_iters", "eval_batch_size",
                             "keep_last_n", "exit_interval", "exit_duration_in_mins", "max_skipped_steps",
                             "save_interval_minutes"])
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if not args.progress_timeout_minutes >= 0:
        raise ConfigError(f"--progress-timeout-minutes must be >= 0 (0: never), got {args.progress_timeout_minutes}")
    if args.no_tensorboard and args.tensorboard_dir:
        raise ConfigError(f"--no-tensorboard and --tensorboard-dir {args.tensorboard_dir} contradict each other; "
                          "drop one")
    if (args.wandb_dir or args.wandb_run_name) and not args.wandb_project:
        raise ConfigError("--wandb-dir and --wandb-run-name need --wandb-project (the Weights & Biases project to "
                          "log to)")
    if args.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package: pip install -e '.[wandb]'") from None
    if args.async_save and not args.save:
        raise ConfigError("--async-save changes how checkpoints are written, but no --save is given: add --save DIR, "
                          "or drop --async-save")
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 are exclusive; pick one")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ConfigError(f"--loss-scale must be positive, got {args.loss_scale}")
    if not 0.0 <= args.warmup <= 1.0:
        raise ConfigError(f"--warmup is a fraction of --lr-decay-iters in [0, 1], got {args.warmup}")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr ({args.min_lr}) is above --lr ({args.lr})")
    if args.load is not None and not os.path.isdir(args.load) and args.load != args.save:
        raise ConfigError(f"--load directory {args.load!r} does not exist; check the path "
                          "(to start fresh, drop --load or set it equal to --save)")
    if args.save is not None:
        check_writable(args.save)
    if args.compile:
        check_compile_toolchain()
    for flag, value, minimum in (("--loss-scale-window", args.loss_scale_window, 1),
                                 ("--hysteresis", args.hysteresis, 1)):
        if value < minimum:
            raise ConfigError(f"{flag} ({value}) must be at least {minimum}")
    check_optimizer_args(args)
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32 - 1] (NumPy's range), got {args.seed}")
    if args.fp16 and args.loss_scale is None and not 0 < args.min_scale <= args.initial_loss_scale:
        raise ConfigError(f"--min-scale ({args.min_scale}) must be positive and at most --initial-loss-scale "
                          f"({args.initial_loss_scale}) for dynamic loss scaling; e.g. --min-scale 1 "
                          "--initial-loss-scale 65536")


def check_optimizer_args(args: argparse.Namespace) -> None:
    """AdamW's own bounds (torch raises a bare ValueError for them when the optimizer is built)."""
    for flag, value in (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    for flag, value in (("--adam-eps", args.adam_eps), ("--weight-decay", args.weight_decay)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")


def check_compile_toolchain() -> None:
    """``--compile`` needs Triton on a GPU and a C++ compiler on CPU: say so at start-up."""
    if torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile needs the triton package on GPUs (pip install triton); or drop --compile")
    elif not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")


def check_writable(directory: str) -> None:
    """Fail at start-up, not at the first checkpoint, when ``--save`` cannot be written."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--save directory {directory!r} is not writable ({error.strerror}); "
                          "pick a directory you can write to") from None


def validate_pipeline_args(args: argparse.Namespace) -> None:
    if args.pipe_parallel_size == 1:
        return
    if not args.deepspeed:
        raise ConfigError(f"--pipe-parallel-size {args.pipe_parallel_size} needs --deepspeed (DeepSpeed's pipeline "
                          "engine runs the stages)")
    if args.num_layers < args.pipe_parallel_size:
        raise ConfigError(f"--num-layers ({args.num_layers}) is fewer than --pipe-parallel-size "
                          f"({args.pipe_parallel_size}) stages; use fewer stages")
    if args.pipe_partition_method not in ("parameters", "uniform") and not args.pipe_partition_method.startswith("type:"):
        raise ConfigError(f"--pipe-partition-method {args.pipe_partition_method!r} is not parameters, uniform or "
                          "type:<layer class regex> (e.g. type:transformer)")
    unsupported = [flag for flag, on in (("--reset-position-ids", args.reset_position_ids),
                                         ("--reset-attention-mask", args.reset_attention_mask)) if on]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} are not supported with --pipe-parallel-size > 1")
    if args.eval_batch_size is not None and args.eval_batch_size != args.batch_size:
        raise ConfigError(f"--eval-batch-size ({args.eval_batch_size}) must equal --batch-size ({args.batch_size}) "
                          f"with --pipe-parallel-size {args.pipe_parallel_size}: the pipeline stages exchange "
                          "activations of one micro-batch shape; drop --eval-batch-size")
    stage = zero_stage(read_deepspeed_json(args.deepspeed_config))
    if stage >= 2:
        raise ConfigError(f"ZeRO stage {stage} ({deepspeed_config_name(args.deepspeed_config)}) cannot be combined "
                          f"with pipeline parallelism (--pipe-parallel-size {args.pipe_parallel_size}); "
                          "use ZeRO stage 0 or 1")


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config_name(value: str) -> str:
    """How errors name ``--deepspeed_config``: its path, or (a config passed inline) that."""
    return value if os.path.isfile(value) or len(value) < 80 else "the inline (base64) DeepSpeed config"


def _inline_deepspeed_json(value: str) -> dict[str, Any] | None:
    """A config passed as URL-safe base64 JSON (as DeepSpeed accepts, and as its autotuner passes
    each experiment's config), or None if ``value`` is not one."""
    try:
        config = json.loads(base64.urlsafe_b64decode(value.encode("ascii") + b"=" * (-len(value) % 4)))
    except (ValueError, UnicodeError):
        return None
    return config if isinstance(config, dict) else None


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON config at ``path`` (a JSON object; or the object itself in URL-safe
    base64), or a ConfigError saying what is wrong. Batch keys set to "auto" (as DeepSpeed's
    autotuner writes them) are dropped: the flags set them."""
    if not os.path.isfile(path):
        config = _inline_deepspeed_json(path)
        if config is None and len(path) >= 80:
            raise ConfigError(f"--deepspeed_config {path[:40]}... ({len(path)} characters) is neither an existing file "
                              "nor a base64-encoded JSON object; pass the path of a DeepSpeed JSON config")
        if config is None:
            raise ConfigError(f"DeepSpeed config {path!r} does not exist")
        path = deepspeed_config_name(path)
    else:
        try:
            with open(path) as handle:
                config = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"DeepSpeed config {path!r} must hold a JSON object")
    config = {key: value for key, value in config.items() if not (key in _BATCH_KEYS and value == "auto")}
    if "scheduler" in config:
        raise ConfigError(f"{path} defines a 'scheduler': remove it, the learning-rate "
                          "schedule comes from --lr, --lr-decay-style, --warmup and --min-lr")
    check_deepspeed_types(config, path)
    return config


def check_deepspeed_types(config: dict[str, Any], path: str) -> None:
    """The keys this project reads from a DeepSpeed config have the types DeepSpeed documents."""
    for key in _BATCH_KEYS:
        value = config.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ConfigError(f"{path}: {key} must be a positive integer (or \"auto\": from the flags), got {value!r}")
    for key, example in (("zero_optimization", '{"stage": 1}'), ("fp16", '{"enabled": true}'),
                         ("bf16", '{"enabled": true}'), ("bfloat16", '{"enabled": true}')):
        if key in config and not isinstance(config[key], dict):
            raise ConfigError(f"{path}: {key} must be a JSON object such as {example}, got {config[key]!r}")
    for key in ("fp16", "bf16", "bfloat16"):
        enabled = config.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{path}: {key}.enabled must be true or false, got {enabled!r} (the precision comes "
                              "from --fp16/--bf16 or this section; \"auto\" is not read here)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if str(stage) not in ("0", "1", "2", "3") or isinstance(stage, bool):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "gradient_clipping" in config:
        _check_ds_number(config["gradient_clipping"], "gradient_clipping", path, "1.0 (0 turns clipping off)")
    if "optimizer" in config:
        _check_ds_optimizer(config["optimizer"], path)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_ds_number(value: Any, key: str, path: str, example: str, positive: bool = False) -> None:
    """ConfigError unless ``value`` is a finite number >= 0 (> 0 if ``positive``); DeepSpeed takes
    any value here and fails (or silently does nothing) later."""
    if not _is_number(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{path}: {key} must be a finite, {kind} number such as {example}, got {value!r}")


def _check_ds_optimizer(optimizer: Any, path: str) -> None:
    """The numeric hyper-parameters of a DeepSpeed ``optimizer`` block are numbers."""
    example = '{"type": "Adam", "params": {"lr": 0.00015}}'
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
        raise ConfigError(f"{path}: optimizer must be a JSON object with a \"type\", such as {example}")
    params = optimizer.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: optimizer.params must be a JSON object such as {{\"lr\": 0.00015}}, got {params!r}")
    for key, positive in (("lr", True), ("weight_decay", False), ("eps", True)):
        if key in params:
            _check_ds_number(params[key], f"optimizer.params.{key}", path, "0.00015" if key == "lr" else "0.01",
                             positive)
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2
                                  and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{path}: optimizer.params.betas must be two numbers in [0, 1) such as [0.9, 0.95], "
                          f"got {betas!r}")


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a checked DeepSpeed config (DeepSpeed also takes "1" for 1)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def validate_deepspeed_args(args: argparse.Namespace) -> None:
    if not args.deepspeed:
        ignored = [flag for flag, on in (("--deepspeed-activation-checkpointing", args.deepspeed_activation_checkpointing),
                                         ("--partition-activations", args.partition_activations)) if on]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} need --deepspeed")
        return
    if not args.deepspeed_config:
        raise ConfigError("--deepspeed needs --deepspeed_config PATH (a DeepSpeed JSON config; see scripts/ds_*.json)")
    if args.no_save_optim:
        raise ConfigError("--no-save-optim is not supported with --deepspeed: the engine always writes its optimizer "
                          "state (ZeRO partitions); drop the flag")
    config = read_deepspeed_json(args.deepspeed_config)
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("writer") is not None:
        raise ConfigError(f"{deepspeed_config_name(args.deepspeed_config)}: checkpoint.writer (DeepSpeed's fast or "
                          "decoupled checkpoint writer) is not supported here: DeepSpeed asks this project's model-parallel unit for "
                          "pipeline sizes it does not provide; drop it (--async-save writes checkpoints in the "
                          "background)")


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check every flag on its own and against the others. Raises ConfigError; changes nothing."""
    validate_data_args(data_config(args, args.seed))
    validate_model_args(args)
    validate_training_args(args)
    validate_deepspeed_args(args)
    validate_pipeline_args(args)
    return args


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    args = build_parser().parse_args(argv)
    return validate_args(args)


# ---- the RunConfig of checked flags ---------------------------------------------------------


def parallel_config(args: argparse.Namespace, launch: LaunchEnv) -> ParallelConfig:
    return build_parallel_config(launch, args.model_parallel_size, args.pipe_parallel_size, args.distributed_backend,
                                 args.distributed_timeout_minutes, args.pipe_partition_method)


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    padded = mpu.pad_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.model_parallel_size)
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings, vocab_size=vocab_size, padded_vocab_size=padded,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, checkpoint_activations=args.checkpoint_activations,
        checkpoint_num_layers=args.checkpoint_num_layers)


def precision_flags(args: argparse.Namespace) -> PrecisionConfig:
    return PrecisionConfig(
        dtype="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32", loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis, min_scale=args.min_scale, fp32_allreduce=args.fp32_allreduce)


def deepspeed_config(args: argparse.Namespace, parallel: ParallelConfig,
                     precision: PrecisionConfig) -> tuple[DeepSpeedConfig, int, str]:
    """The resolved DeepSpeed section, the gradient accumulation steps and the precision.

    Without ``--deepspeed``: accumulation is the flag (default 1), precision the flags'.
    """
    requested = accumulation_for_global_batch(args.global_batch_size, args.batch_size, parallel.data_parallel_size,
                                              args.gradient_accumulation_steps)
    if not args.deepspeed:
        return DeepSpeedConfig(), requested or 1, precision.dtype
    config = read_deepspeed_json(args.deepspeed_config)
    accumulation = resolve_deepspeed_batch(config, args.batch_size, parallel.data_parallel_size, requested,
                                           args.global_batch_size)
    dtype = resolve_deepspeed_precision(config, precision, torch.cuda.is_available())
    config.setdefault("gradient_clipping", args.clip_grad)
    config.setdefault("steps_per_print", 10**9)  # the training loop logs
    config.setdefault("wall_clock_breakdown", False)
    check_deepspeed_config(config, deepspeed_config_name(args.deepspeed_config))
    section = DeepSpeedConfig(
        enabled=True, config_path=deepspeed_config_name(args.deepspeed_config),
        config_json=json.dumps(config, sort_keys=True),
        activation_checkpointing=args.deepspeed_activation_checkpointing,
        partition_activations=args.partition_activations, contiguous_checkpointing=args.contigious_checkpointing,
        checkpoint_in_cpu=args.checkpoint_in_cpu, synchronize_each_layer=args.synchronize_each_layer,
        profile_backward=args.profile_backward)
    return section, accumulation, dtype


def accumulation_for_global_batch(global_batch: int | None, micro: int, data_parallel: int,
                                  accumulation: int | None) -> int | None:
    """The gradient accumulation steps ``--global-batch-size`` implies (None without it: the flag's)."""
    if global_batch is None:
        return accumulation
    per_step = micro * data_parallel
    if global_batch % per_step:
        raise ConfigError(f"--global-batch-size {global_batch} is not a multiple of --batch-size {micro} x "
                          f"data-parallel size {data_parallel} = {per_step}: pick a global batch divisible by "
                          f"{per_step}, or another --batch-size")
    derived = global_batch // per_step
    if accumulation is not None and accumulation != derived:
        raise ConfigError(f"--gradient-accumulation-steps {accumulation} contradicts --global-batch-size "
                          f"{global_batch} = --batch-size {micro} x data-parallel size {data_parallel} x {derived}: "
                          "drop --gradient-accumulation-steps (it is derived)")
    return derived


def training_config(args: argparse.Namespace, accumulation: int) -> TrainingConfig:
    return TrainingConfig(
        micro_batch_size=args.batch_size, gradient_accumulation_steps=accumulation, train_iters=args.train_iters,
        eval_batch_size=args.eval_batch_size or args.batch_size, eval_iters=args.eval_iters,
        eval_interval=args.eval_interval, seed=args.seed, compile=args.compile,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, max_skipped_steps=args.max_skipped_steps,
        exit_signal_handler=args.exit_signal_handler, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, progress_timeout_minutes=args.progress_timeout_minutes,
        keep_host_memory=not args.release_host_memory)


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_decay_iters=args.lr_decay_iters or args.train_iters, warmup=args.warmup,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad)


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    return CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval, keep_last_n=args.keep_last_n,
        save_interval_minutes=args.save_interval_minutes,
        save_optim=not args.no_save_optim, save_rng=not args.no_save_rng, load_optim=not args.no_load_optim,
        load_rng=not args.no_load_rng, finetune=args.finetune,
        override_tokenizer_check=args.override_tokenizer_check, async_save=args.async_save)


def logging_config(args: argparse.Namespace) -> LoggingConfig:
    return LoggingConfig(log_interval=args.log_interval, log_timers=args.log_timers,
                         tensorboard_dir=args.tensorboard_dir, tensorboard=not args.no_tensorboard,
                         wandb_project=args.wandb_project, wandb_dir=args.wandb_dir,
                         wandb_run_name=args.wandb_run_name,
                         exp_dir=args.exp_dir,
                         peak_tflops=args.peak_tflops)


def warn_pipeline_bubble(run: RunConfig) -> None:
    pipe, accumulation = run.parallel.pipe_parallel_size, run.training.gradient_accumulation_steps
    if pipe > 1 and accumulation < pipe and run.parallel.rank == 0:
        print(f" warning: {accumulation} micro batches per step for {pipe} pipeline stages: most stages idle "
              "(pipeline bubble); raise --gradient-accumulation-steps", flush=True)


def build_run_config(args: argparse.Namespace, vocab_size: int, eod_token: int,
                     environ: Mapping[str, str] | None = None) -> RunConfig:
    """The whole, frozen configuration of a training run from checked flags (``get_args``), the
    tokenizer's vocabulary size and end-of-document token (``--vocab-size`` overrides the size),
    and the launch environment (``environ``, default ``os.environ``). Raises ConfigError."""
    parallel = parallel_config(args, read_launch_env(environ))
    flags = precision_flags(args)
    deepspeed, accumulation, dtype = deepspeed_config(args, parallel, flags)
    precision = dataclasses.replace(flags, dtype=dtype)
    run = RunConfig(
        model=model_config(args, args.vocab_size or vocab_size), data=data_config(args, args.seed),
        parallel=parallel, precision=precision, optimizer=optimizer_config(args),
        training=training_config(args, accumulation), logging=logging_config(args),
        checkpoint=checkpoint_config(args), deepspeed=deepspeed, eod_token=eod_token,
        tokenizer_sha256=tokenizer_fingerprint(data_config(args, args.seed)),
        flags_json=json.dumps(vars(args), sort_keys=True, default=str))
    warn_pipeline_bubble(run)
    return run
