"""Every RNG state a run depends on, as plain values and tensors (loadable with weights_only=True).

The model-parallel tracker is the one the model draws its model-parallel dropout from
(``Backend.rng_tracker``: ``mpu``'s, or DeepSpeed's under its activation checkpointing).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from megatron import mpu


def get_rng_states(tracker: Any = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU, CUDA (when present) and model-parallel tracker states
    (``tracker`` default: ``mpu.get_cuda_rng_tracker()``)."""
    tracker = mpu.get_cuda_rng_tracker() if tracker is None else tracker
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tracker.get_states(),
    }


def set_rng_states(states: dict[str, Any], tracker: Any = None) -> None:
    """Restore what ``get_rng_states`` captured (``tracker``: the one it was captured from)."""
    tracker = mpu.get_cuda_rng_tracker() if tracker is None else tracker
    random.setstate(_as_tuple(states["random_rng_state"]))
    np_state = states["np_rng_state"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(states["torch_rng_state"])
    if states.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda_rng_state"])
    tracker.set_states(states["rng_tracker_states"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs tuples; serialisers may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
