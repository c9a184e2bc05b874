"""Pipeline parallelism through DeepSpeed's pipeline engine.

The model arrives as a ``PipelineDescription`` (plain torch blocks, see
``megatron.model.gpt2_pipe``); this module turns it into a ``PipelineModule`` over a pipe x data x
model topology that matches ``megatron.mpu``'s groups, and drives the engine's ``train_batch`` /
``eval_batch`` with micro batches from the task's ``PipelineBatchFn``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megatron.backends.base import PipelineBatchFn, StepResult
from megatron.backends.deepspeed import (
    DeepSpeedEngineBackend,
    activation_checkpointing,
    init_deepspeed_comm,
    initialize_engine,
    step_result,
)
from megatron.config import RunConfig
from megatron.model import ActivationCheckpointing, use_activation_checkpointing
from megatron.model.gpt2_pipe import PipelineDescription, TransformerLayerPipe


def build_pipeline_module(description: PipelineDescription, run: RunConfig,
                          functions: ActivationCheckpointing) -> Any:
    """DeepSpeed's ``PipelineModule`` of ``description`` on this rank's stage."""
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
    parallel = run.parallel
    topology = PipeModelDataParallelTopology(num_pp=parallel.pipe_parallel_size, num_mp=parallel.model_parallel_size,
                                             num_dp=parallel.data_parallel_size)
    interval = run.model.checkpoint_num_layers if run.model.checkpoint_activations else 0
    # Only transformer layers are recomputed: a reentrant checkpoint function (mpu's, DeepSpeed's)
    # needs an input that requires grad, and the first stage's embedding gets token ids.
    return PipelineModule(layers=specs, loss_fn=description.loss_fn, topology=topology,
                          partition_method=parallel.pipe_partition_method, activation_checkpoint_interval=interval,
                          activation_checkpoint_func=functions.checkpoint,
                          checkpointable_layers=[TransformerLayerPipe.__name__])


class PipelineBatches:
    """Endless iterator of micro batches ``(inputs, labels)`` for the pipeline engine."""

    def __init__(self, data_iterator: Iterator | None, batch_fn: PipelineBatchFn, run: RunConfig) -> None:
        self.data_iterator, self.batch_fn, self.run = data_iterator, batch_fn, run

    def __iter__(self) -> PipelineBatches:
        return self

    def __next__(self) -> tuple[Any, Any]:
        return self.batch_fn(self.data_iterator, self.run)


class PipelineBackend(DeepSpeedEngineBackend):
    """DeepSpeed's pipeline engine: ``train_batch`` runs all micro batches of one step."""

    name = "deepspeed-pipeline"

    def __init__(self, description: PipelineDescription, run: RunConfig, batch_fn: PipelineBatchFn) -> None:
        self.run = run
        self.batch_fn = batch_fn
        functions = activation_checkpointing(run)
        module = build_pipeline_module(description, run, functions)
        use_activation_checkpointing(module, functions)
        self.rng_tracker = functions.rng_tracker
        self.unwrapped_model = module
        self.model, self.optimizer, self.lr_scheduler = initialize_engine(module, run, None)

    def train_step(self, data_iterator: Iterator | None) -> StepResult:
        loss = self.model.train_batch(data_iter=PipelineBatches(data_iterator, self.batch_fn, self.run))
        return step_result(self.model, loss.detach().float().reshape(()))

    def eval_loss(self, data_iterator: Iterator | None) -> torch.Tensor:
        """Mean loss of one step's worth of micro batches, already averaged over data parallel and
        broadcast to every stage (averaging it again over data parallel leaves it unchanged)."""
        loss = self.model.eval_batch(PipelineBatches(data_iterator, self.batch_fn, self.run))
        return loss.detach().float().reshape(())
