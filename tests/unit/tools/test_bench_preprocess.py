"""tools/bench_preprocess.py: the steady-state split, the ratios, and a tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_preprocess as bench  # noqa: E402


def test_steady_state_separates_start_up_from_rate():
    # 1.5 s of start-up, then 1 MB tasks at 10 MB/s arriving in pairs (two workers), 0.2 s tail.
    timeline = [(1.5 + 0.2 * (i // 2 + 1), (i + 1) * 1_000_000) for i in range(40)]
    rate, startup = bench.steady_state(timeline, timeline[-1][0] + 0.2, 40_000_000)
    assert rate == pytest.approx(10.0, rel=0.05)
    assert startup == pytest.approx(1.7, abs=0.2)
    assert bench.steady_state([(0.5, 100)], 1.0, 100) == (100 / 1e6, 0.0)


def row(corpus: str, tokenizer: str, mode: str, rate: float) -> dict:
    return {"corpus": corpus, "tokenizer": tokenizer, "mode": mode, "mb_per_cpu_s": rate, "steady_mb_per_s": rate}


def test_ratios_follow_the_issue():
    rows = [row("mixed", "tiktoken", "tokenizer only, lists", 12.0),
            row("mixed", "tiktoken", "tokenizer only, arrays", 15.0),
            row("mixed", "hf-tokenizers", "tokenizer only, lists", 3.0),
            row("mixed", "tiktoken", "pipeline, 1 worker(s)", 13.5), row("mixed", "tiktoken", "pipeline, 2 worker(s)", 24.0),
            row("mixed", "pure-python", "pipeline, 1 worker(s)", 2.0)]
    assert bench.ratios(rows)["mixed"] == pytest.approx(
        {"tokenizer_only_vs_hf": 4.0, "pipeline_2w_vs_pure_python_1w": 12.0,
         "per_worker_vs_tokenizer_only_1w": 0.9, "per_worker_vs_tokenizer_only_2w": 0.8})


def test_tiny_run_writes_every_row(tmp_path, capsys):
    output = tmp_path / "preprocess.json"
    assert bench.main(["--megabytes", "0.3", "--mixed-megabytes", "0.3", "--repeats", "1",
                       "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert len(result["rows"]) == 2 * (len(bench.TOKENIZER_ONLY) + len(bench.PIPELINES))
    assert set(result["ratios"]) == {"demo-repeated", "mixed"}
    assert all(row["startup_seconds"] >= 0 for row in result["rows"] if "startup_seconds" in row)
    assert "target >= 10x" in capsys.readouterr().out
