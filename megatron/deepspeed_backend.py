"""The DeepSpeed side of the seam in ``megatron.backends`` (only these two modules and
``arguments.py`` import deepspeed).

The engine owns data-parallel gradient averaging, precision, loss scaling, ZeRO, clipping and
its checkpoint files; this class adapts it to the training loop's interface.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megatron import mpu
from megatron.backends import (
    ForwardStep,
    StepResult,
    average_over_data_parallel,
    build_lr_scheduler,
    build_optimizer,
    maybe_compile,
)
from megatron.errors import ConfigError
from megatron.model.gpt2_modeling import gpt2_get_params_for_weight_decay_optimization


def resolve_batch_sizes(config: dict[str, Any], args: argparse.Namespace) -> None:
    """Derive micro batch, accumulation and global batch from each other; contradictions fail.

    ``--batch-size`` is the micro batch per data-parallel rank. Fills the three keys of
    ``config`` and ``args.gradient_accumulation_steps``.
    """
    micro, dp = args.batch_size, args.data_parallel_size
    config_micro = config.get("train_micro_batch_size_per_gpu")
    config_total = config.get("train_batch_size")
    config_accum = config.get("gradient_accumulation_steps")
    numbers = (f"--batch-size {micro}, data-parallel size {dp}, --gradient-accumulation-steps "
               f"{args.gradient_accumulation_steps}; config train_batch_size {config_total}, "
               f"train_micro_batch_size_per_gpu {config_micro}, gradient_accumulation_steps {config_accum}")
    if config_micro is not None and config_micro != micro:
        raise ConfigError(f"batch sizes disagree ({numbers}): the config's micro batch must equal --batch-size; "
                          "drop train_micro_batch_size_per_gpu from the config or fix --batch-size")
    accum = args.gradient_accumulation_steps
    if accum is not None and config_accum is not None and accum != config_accum:
        raise ConfigError(f"batch sizes disagree ({numbers}): gradient accumulation differs")
    accum = accum or config_accum
    if accum is None:
        accum = config_total // (micro * dp) if config_total else 1
    if config_total is not None and config_total != micro * accum * dp:
        raise ConfigError(f"batch sizes disagree ({numbers}): train_batch_size must equal --batch-size x "
                          f"gradient accumulation x data-parallel size = {micro} x {accum} x {dp} = "
                          f"{micro * accum * dp}; fix the config or the flags")
    args.gradient_accumulation_steps = accum
    config.update(train_batch_size=micro * accum * dp, train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=accum)


def resolve_precision(config: dict[str, Any], args: argparse.Namespace) -> None:
    """Make the flags and the config's fp16/bf16 sections agree (a contradiction fails)."""
    config_fp16 = bool(config.get("fp16", {}).get("enabled", False))
    config_bf16 = bool(config.get("bf16", config.get("bfloat16", {})).get("enabled", False))
    for flag, on_flag, on_config, name in (("--fp16", args.fp16, config_fp16, "fp16"),
                                           ("--bf16", args.bf16, config_bf16, "bf16")):
        if on_flag and not on_config and name in config:
            raise ConfigError(f"{flag} is given but the DeepSpeed config disables {name}; make them agree")
    args.fp16 = args.fp16 or config_fp16
    args.bf16 = args.bf16 or config_bf16
    if args.fp16 and args.bf16:
        raise ConfigError("fp16 and bf16 are both enabled (flags or DeepSpeed config); pick one")
    if args.fp16 and not torch.cuda.is_available():
        raise ConfigError("DeepSpeed's fp16 needs a GPU; on CPU use --bf16 (or a bf16 config)")
    if args.fp16 and "fp16" not in config:
        config["fp16"] = {"enabled": True, "loss_scale": args.loss_scale or 0,
                          "initial_scale_power": int(math.log2(args.initial_loss_scale)),
                          "loss_scale_window": args.loss_scale_window, "hysteresis": args.hysteresis,
                          "min_loss_scale": args.min_scale}
    if args.bf16 and "bf16" not in config and "bfloat16" not in config:
        config["bf16"] = {"enabled": True}
    args.params_dtype = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def build_deepspeed_config(args: argparse.Namespace) -> dict[str, Any]:
    config = copy.deepcopy(args.deepspeed_config_dict)
    if "scheduler" in config:
        raise ConfigError(f"{args.deepspeed_config} defines a 'scheduler': remove it, the learning-rate "
                          "schedule comes from --lr, --lr-decay-style, --warmup and --min-lr")
    resolve_batch_sizes(config, args)
    resolve_precision(config, args)
    config.setdefault("gradient_clipping", args.clip_grad)
    config.setdefault("steps_per_print", 10**9)  # the training loop logs
    config.setdefault("wall_clock_breakdown", False)
    return config


def init_deepspeed_comm() -> None:
    """Let DeepSpeed wrap the existing process group (before anything of it communicates)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def configure_activation_checkpointing(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Route ``mpu.checkpoint`` and the RNG tracker through DeepSpeed's activation checkpointing."""
    import deepspeed

    init_deepspeed_comm()
    deepspeed.checkpointing.configure(
        mpu, deepspeed_config=None, partition_activations=args.partition_activations,
        contiguous_checkpointing=args.contigious_checkpointing, num_checkpoints=args.num_layers,
        checkpoint_in_cpu=args.checkpoint_in_cpu, synchronize=args.synchronize_each_layer,
        profile=args.profile_backward)
    mpu.checkpoint = deepspeed.checkpointing.checkpoint
    mpu.get_cuda_rng_tracker = deepspeed.checkpointing.get_cuda_rng_tracker
    mpu.model_parallel_cuda_manual_seed = deepspeed.checkpointing.model_parallel_cuda_manual_seed
    mpu.model_parallel_cuda_manual_seed(args.seed)


class DeepSpeedBackend:
    """``deepspeed.initialize`` with our model, optimizer (or the config's) and LR schedule."""

    name = "deepspeed"
    writes_deepspeed_latest = True  # DeepSpeed's own tools look for <save>/latest

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.args = args
        self.config = build_deepspeed_config(args)
        if args.deepspeed_activation_checkpointing:
            configure_activation_checkpointing(args, self.config)
        self.unwrapped_model = model
        self._initialize(model, mpu)

    def _initialize(self, model: nn.Module, model_parallel_unit: Any) -> None:
        import deepspeed

        args, config = self.args, self.config
        maybe_compile(model, args)
        param_groups = gpt2_get_params_for_weight_decay_optimization(model)
        ds_args = copy.copy(args)
        ds_args.deepspeed_config = None  # the resolved config is passed below
        if "optimizer" in config:
            optimizer, model_parameters = None, param_groups
        else:
            optimizer, model_parameters = build_optimizer(param_groups, args), None
        self.model, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=model_parameters, args=ds_args,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, args), mpu=model_parallel_unit,
            dist_init_required=False, config=config)

    def train_step(self, forward_step: ForwardStep, num_micro_batches: int, data_iterator: Any = None) -> StepResult:
        total = torch.zeros((), device=self.args.device)
        for _ in range(num_micro_batches):
            loss = forward_step()
            self.model.backward(loss)
            self.model.step()
            total += loss.detach().float()
        applied = self.model.was_step_applied()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None and applied else None
        return StepResult.from_host(average_over_data_parallel(total / num_micro_batches), not applied, norm)

    def loss_scale(self) -> float:
        if not self.args.fp16:
            return 1.0
        optimizer = self.model.optimizer
        scale = getattr(optimizer, "cur_scale", None)
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

    def save_state(self, root: str, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank calls the engine's ``save_checkpoint`` (ZeRO shards are per rank)."""
        self.model.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)

    def eval_loss(self, forward_step: Callable[..., torch.Tensor], data_iterator: Any) -> torch.Tensor:
        return forward_step(data_iterator, self.model, self.args)

    def load_state(self, root: str, tag: str, load_optimizer: bool) -> dict[str, Any]:
        directory = os.path.join(root, tag)
        model_file = self.model._get_ckpt_name(root, tag)  # this rank's file, whatever the mode
        if not os.path.isfile(model_file):
            if os.path.isdir(os.path.join(directory, "mp_rank_00")):
                raise ConfigError(f"{directory} is a Megatron (non-DeepSpeed) checkpoint: drop --deepspeed to "
                                  "load it, or convert it with tools/convert_checkpoint.py")
            raise ConfigError(f"{model_file} is missing: the checkpoint was saved with another "
                              "--model-parallel-size or is incomplete")
        try:
            path, state = self.model.load_checkpoint(root, tag=tag, load_optimizer_states=load_optimizer,
                                                     load_lr_scheduler_states=load_optimizer)
        except (RuntimeError, OSError, KeyError, EOFError) as error:
            raise ConfigError(f"DeepSpeed checkpoint {directory} cannot be loaded ({type(error).__name__}: "
                              f"{str(error)[:300]}); it is corrupt or from another model/ZeRO setup") from None
        if path is None:
            raise ConfigError(f"DeepSpeed could not load {directory}")
        return state
