"""tools/bench_generation.py's flags: a count that cannot run is one line at start-up, not a
ZeroDivisionError or a StatisticsError after the models are built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_generation as bench  # noqa: E402


@pytest.mark.parametrize("flags,message", [
    (["--batch-sizes", "2", "0"], "--batch-sizes must be at least 1, got 0"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1, got 0"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    (["--rounds", "0"], "--rounds must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
])
def test_counts_below_one_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench.parse_args(flags)


def test_defaults_parse() -> None:
    args = bench.parse_args([])
    assert args.batch_sizes == [1, 8] and args.rounds == 3
