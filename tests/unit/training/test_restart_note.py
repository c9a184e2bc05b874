"""The start-up note of a restarted group says why it was restarted (issue 18)."""

from __future__ import annotations

import pytest

from megatron.config import ParallelConfig
from megatron.training.loop import restart_note


def _parallel(world: int, restart_count: int = 0) -> ParallelConfig:
    return ParallelConfig(rank=0, world_size=world, local_rank=0, restart_count=restart_count, max_restarts=3)


@pytest.mark.parametrize("world,count,saved,restarts,expected", [
    (2, 0, None, (0, 0), None),  # a first start
    (2, 0, 2, (0, 0), None),  # a relaunch at the same size
    (2, 0, 1, (0, 0), "the group grew to 2 ranks: a node joined"),
    (2, 1, 2, (0, 1), "the group grew to 2 ranks: a node joined"),  # it joined after a failure
    (1, 1, 2, (1, 1), "restart 1 of at most 3 (torchrun): a rank or node of the previous attempt failed"),
    (1, 0, 2, (0, 0), "the group changed size: resumed at iteration 4 on 1 ranks from a checkpoint written by 2"),
], ids=["first start", "same size", "grew", "joined after a failure", "failure", "relaunched smaller"])
def test_the_note_says_why(world: int, count: int, saved: int | None, restarts: tuple[int, int],
                           expected: str | None) -> None:
    note = restart_note(_parallel(world, count), saved, 4, restarts)
    assert (note is None) if expected is None else (note is not None and expected in note), note
