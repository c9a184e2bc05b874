"""Pipeline parallelism through DeepSpeed's pipeline engine (part of the DeepSpeed seam).

The model arrives as a ``PipelineDescription`` (plain torch blocks); this module turns it into a
``PipelineModule`` over a pipe x data x model topology that matches ``megatron.mpu``'s groups,
and drives the engine's ``train_batch`` / ``eval_batch``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron import mpu
from megatron.backends import StepResult
from megatron.deepspeed_backend import DeepSpeedBackend, build_deepspeed_config, init_deepspeed_comm
from megatron.model.gpt2_pipe import PipelineDescription

PipelineBatchFn = Callable[[Iterator | None, argparse.Namespace], tuple[Any, Any]]


def build_pipeline_module(description: PipelineDescription, args: argparse.Namespace) -> Any:
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    init_deepspeed_comm()
    specs = []
    for block in description.blocks:
        if block.tied_key is None:
            specs.append(LayerSpec(block.module_class, **block.kwargs))
        else:
            specs.append(TiedLayerSpec(block.tied_key, block.module_class, forward_fn=block.forward_fn,
                                       tied_weight_attr=block.tied_weight_attr, **block.kwargs))
    topology = PipeModelDataParallelTopology(num_pp=args.pipe_parallel_size, num_mp=args.model_parallel_size,
                                             num_dp=args.data_parallel_size)
    interval = args.checkpoint_num_layers if args.checkpoint_activations else 0
    return PipelineModule(layers=specs, loss_fn=description.loss_fn, topology=topology,
                          partition_method=args.pipe_partition_method, activation_checkpoint_interval=interval,
                          activation_checkpoint_func=lambda function, *inputs: mpu.checkpoint(function, *inputs))


class PipelineBatches:
    """Endless iterator of micro batches ``(inputs, labels)`` for the pipeline engine."""

    def __init__(self, data_iterator: Iterator | None, batch_fn: PipelineBatchFn, args: argparse.Namespace) -> None:
        self.data_iterator, self.batch_fn, self.args = data_iterator, batch_fn, args

    def __iter__(self) -> PipelineBatches:
        return self

    def __next__(self) -> tuple[Any, Any]:
        return self.batch_fn(self.data_iterator, self.args)


class PipelineBackend(DeepSpeedBackend):
    """DeepSpeed's pipeline engine: ``train_batch`` runs all micro batches of one step."""

    name = "deepspeed-pipeline"

    def __init__(self, description: PipelineDescription, args: argparse.Namespace) -> None:
        self.args = args
        self.config = build_deepspeed_config(args)
        stage = self.config.get("zero_optimization", {}).get("stage", 0)
        if stage >= 2:
            from megatron.errors import ConfigError

            raise ConfigError(f"ZeRO stage {stage} cannot be combined with pipeline parallelism "
                              f"(--pipe-parallel-size {args.pipe_parallel_size}); use ZeRO stage 0 or 1")
        if args.gradient_accumulation_steps < args.pipe_parallel_size and torch.distributed.get_rank() == 0:
            print(f" warning: {args.gradient_accumulation_steps} micro batches per step for "
                  f"{args.pipe_parallel_size} pipeline stages: most stages idle (pipeline bubble); raise "
                  "--gradient-accumulation-steps", flush=True)
        if args.deepspeed_activation_checkpointing:
            from megatron.deepspeed_backend import configure_activation_checkpointing

            configure_activation_checkpointing(args, self.config)
        module = build_pipeline_module(description, args)
        self.unwrapped_model = module
        self.batch_fn: PipelineBatchFn | None = description.extras.get("batch_fn")
        self._initialize(module, None)

    def train_step(self, forward_step: Any, num_micro_batches: int, data_iterator: Any = None) -> StepResult:
        loss = self.model.train_batch(data_iter=PipelineBatches(data_iterator, self.batch_fn, self.args))
        applied = self.model.was_step_applied()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None and applied else None
        return StepResult.from_host(loss.detach().float().reshape(()), not applied, norm)

    def eval_loss(self, forward_step: Any, data_iterator: Any) -> torch.Tensor:
        """Mean loss of one step's worth of micro batches, already averaged over data parallel and
        broadcast to every stage (averaging it again over data parallel leaves it unchanged)."""
        loss = self.model.eval_batch(PipelineBatches(data_iterator, self.batch_fn, self.args))
        return loss.detach().float().reshape(())
