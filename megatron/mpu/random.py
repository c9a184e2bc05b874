"""RNG state tracking for model-parallel dropout, and activation checkpointing that replays it.

The default generator is seeded identically on every rank, so dropout outside model-parallel
regions (on replicated activations) draws the same mask on every rank. Inside model-parallel
regions (attention probabilities of this rank's heads) dropout runs under
``get_cuda_rng_tracker().fork()``, whose generator is seeded ``seed + 2718 + mp_rank``: masks
differ across model-parallel ranks and agree across data-parallel replicas.

"cuda" in the names is Megatron's; on a CPU-only machine the same code drives the CPU generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import detach_variable

from .initialize import get_model_parallel_rank

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _device_generator_is_cuda() -> bool:
    return torch.cuda.is_available()


def get_device_rng_state() -> torch.Tensor:
    """State of the generator dropout uses: CUDA's when there is a GPU, else the CPU's."""
    if _device_generator_is_cuda():
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def set_device_rng_state(state: torch.Tensor) -> None:
    if _device_generator_is_cuda():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def _seed_device_generator(seed: int) -> None:
    if _device_generator_is_cuda():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class CudaRNGStatesTracker:
    """Named generator states that ``fork`` swaps in and out of the device generator."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        saved = get_device_rng_state()
        _seed_device_generator(seed)
        self.states_[name] = get_device_rng_state()
        set_device_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not tracked; call model_parallel_cuda_manual_seed")
        saved = get_device_rng_state()
        set_device_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = get_device_rng_state()
            set_device_rng_state(saved)


_CUDA_RNG_STATE_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    return _CUDA_RNG_STATE_TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` and the model-parallel one per mp rank.

    Call after ``initialize_model_parallel`` on every rank with the same ``seed``.
    """
    model_parallel_seed = seed + 2718 + get_model_parallel_rank()
    _seed_device_generator(seed)
    _CUDA_RNG_STATE_TRACKER.reset()
    _CUDA_RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, model_parallel_seed)


def _capture_rng() -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda_state, _CUDA_RNG_STATE_TRACKER.get_states()


def _restore_rng(states: tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]) -> None:
    cpu_state, cuda_state, tracker_states = states
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state)
    _CUDA_RNG_STATE_TRACKER.set_states(tracker_states)


class CheckpointFunction(torch.autograd.Function):
    """Run ``function`` without keeping activations; recompute them in backward.

    The CPU, CUDA and tracker RNG states of the forward are restored for the recomputation, so
    dropout draws the same masks twice, and the states of the backward are put back afterwards.
    """

    @staticmethod
    def forward(ctx, run_function, *args):
        ctx.run_function = run_function
        ctx.fwd_rng_states = _capture_rng()
        with torch.no_grad():
            outputs = run_function(*args)
        ctx.save_for_backward(*args)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = detach_variable(ctx.saved_tensors)
        bwd_rng_states = _capture_rng()
        _restore_rng(ctx.fwd_rng_states)
        with torch.enable_grad():
            outputs = ctx.run_function(*inputs)
        _restore_rng(bwd_rng_states)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(inp.grad if isinstance(inp, torch.Tensor) else None for inp in inputs)
        return (None,) + grads


def checkpoint(function: Any, *args: Any) -> Any:
    """Activation checkpointing that replays the model-parallel RNG states (see CheckpointFunction).

    Only tensor positional arguments are supported; ``None`` is passed through as an argument.
    """
    return CheckpointFunction.apply(function, *args)
