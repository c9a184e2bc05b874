"""The checksum-cost benchmark runs end to end at a tiny size and writes its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_checkpoint_verify  # noqa: E402


def test_tiny_run_writes_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out.json"
    assert bench_checkpoint_verify.main(["--params", "20000", "--rounds", "1", "--dir", str(tmp_path),
                                         "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert set(result["seconds"]) == {"save", "digest_warm", "load_cold", "digest_cold", "load_warm"}
    assert result["bytes"] > 20000 * 12 and "save with checksums" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # its scratch file is gone


@pytest.mark.parametrize("argv", [["--params", "0"], ["--rounds", "0"], ["--dir", "/no/such/dir"]])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_checkpoint_verify.parse_args(argv)
    assert exit_info.value.code == 2
