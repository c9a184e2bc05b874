"""Megatron-LM's ``utils`` names, for scripts written against the original layout.

The implementations live in the ``megatron`` package; this module only re-exports them.
"""

from megatron.checkpoint.protocol import load_checkpoint, save_checkpoint
from megatron.checkpoint.rng import get_rng_states, set_rng_states
from megatron.training.log import print_rank_0
from megatron.training.timers import Timers, memory_report

report_memory = memory_report

__all__ = ["Timers", "get_rng_states", "load_checkpoint", "memory_report", "print_rank_0", "report_memory",
           "save_checkpoint", "set_rng_states"]
