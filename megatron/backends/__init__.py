"""The one seam between the Megatron and the DeepSpeed training paths.

Both paths differ only in: initialisation, backward, optimizer step, the reported loss scale and
checkpoint files. ``build_backend`` picks one at start-up from the ``RunConfig``; the training
loop and checkpointing call the ``Backend`` protocol (``megatron.backends.base``) on either.
"""

from __future__ import annotations

from torch import nn

from megatron.backends.base import Backend, ForwardStep, PipelineBatchFn, StepResult
from megatron.config import RunConfig
from megatron.model.gpt2_pipe import PipelineDescription

__all__ = ["Backend", "ForwardStep", "PipelineBatchFn", "StepResult", "build_backend"]


def build_backend(model: nn.Module | PipelineDescription, run: RunConfig, forward_step: ForwardStep,
                  pipeline_batch: PipelineBatchFn | None = None) -> Backend:
    """The Megatron backend, or with ``--deepspeed`` the DeepSpeed one; with
    ``--pipe-parallel-size`` > 1 the pipeline engine (``model`` is then a ``PipelineDescription``
    and ``pipeline_batch`` makes its micro batches)."""
    if run.parallel.pipe_parallel_size > 1:
        from megatron.backends.pipeline import PipelineBackend

        if not isinstance(model, PipelineDescription) or pipeline_batch is None:
            raise TypeError("a pipelined run needs a PipelineDescription and a pipeline batch function; "
                            "entry points without them must refuse --pipe-parallel-size at start-up")
        return PipelineBackend(model, run, pipeline_batch)
    if run.deepspeed.enabled:
        from megatron.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(model, run, forward_step)
    from megatron.backends.megatron import MegatronBackend

    return MegatronBackend(model, run, forward_step)
