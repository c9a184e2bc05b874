"""The resharding-memory benchmark runs end to end at a tiny size and writes its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_reshard_memory  # noqa: E402


def test_tiny_run_measures_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out.json"
    assert bench_reshard_memory.main(["--layers", "1", "--hidden", "64", "--heads", "4", "--vocab", "1000",
                                      "--dir", str(tmp_path), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert [(r["model_parallel"], r["rank"]) for r in result["load"]] == [(1, 0), (2, 0), (2, 1)]
    assert result["load"][1]["own_state_mb"] < result["load"][0]["own_state_mb"]  # each rank reads its share
    assert "rank 0: read the checkpoint, write the copy" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # its scratch directory is gone


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--hidden", "100", "--heads", "12"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_reshard_memory.parse_args(argv)
    assert exit_info.value.code == 2
