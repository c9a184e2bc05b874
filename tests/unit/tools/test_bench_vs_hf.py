"""tools/bench_vs_hf.py without running a step: shape presets, recipes, order, ratios and tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_vs_hf as bench  # noqa: E402


def test_shape_preset_and_overrides() -> None:
    opts = bench.parse_args(["--shape", "124m", "--batch-size", "2"])
    assert (opts.num_layers, opts.hidden_size, opts.num_attention_heads, opts.seq_length) == (12, 768, 12, 512)
    assert opts.batch_size == 2 and opts.rounds == 3
    default = bench.parse_args([])
    assert (default.num_layers, default.hidden_size, default.seq_length, default.batch_size) == (4, 256, 256, 8)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_recipes_say_how_weights_are_held() -> None:
    assert bench.recipe("megatron", "bf16") == "bf16 weights, fp32 masters"
    assert bench.recipe("hf-compile", "bf16") == "fp32 weights, autocast bf16"
    assert bench.recipe("hf-bf16-weights", "bf16") == "bf16 weights, fp32 masters"
    assert bench.recipe("hf", "fp32") == "fp32 weights"
    assert not bench.applies("hf-bf16-weights", "fp32") and bench.applies("hf", "fp32")


def _result(path: str, precision: str, step_s: float) -> dict:
    return {"path": path, "precision": precision, "step_s": [step_s], "warmup_s": [5.0], "peak_tflops": 1.0,
            "peak_source": "measured matmul", "max_rss_mb": 1024.0}


def test_sweep_reverses_the_order_every_other_round(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(bench, "spawn", lambda argv, path, precision, profile, malloc_no_mmap: (
        calls.append((path, precision, profile)) or _result(path, precision, 1.0)))
    opts = bench.parse_args(["--rounds", "2", "--precisions", "fp32", "--paths", "megatron", "hf", "--profile", "5"])
    bench.sweep(opts, [])
    assert calls == [("megatron", "fp32", 5), ("hf", "fp32", 5), ("hf", "fp32", 0), ("megatron", "fp32", 0)]


def test_ratios_and_best_path_per_precision() -> None:
    opts = bench.parse_args(["--rounds", "2"])
    steps = {("megatron", "bf16"): [1.0, 1.0], ("megatron-compile", "bf16"): [0.8, 1.0],
             ("hf", "bf16"): [2.0, 1.6], ("hf-compile", "bf16"): [1.2, 1.2]}
    runs = {key: [bench.summarise(opts, _result(*key, s)) for s in values] for key, values in steps.items()}
    rows = [bench.pool(opts, results) for results in runs.values()]
    bench.add_ratios(rows, runs)
    by_path = {row["path"]: row for row in rows}
    assert by_path["megatron"]["vs_hf_per_round"] == pytest.approx([2.0, 1.6])
    assert by_path["megatron"]["vs_hf_compile"] == pytest.approx(1.2)
    [summary] = bench.best_of_ours(rows, runs, ["bf16"])
    assert summary["path"] == "megatron-compile"  # pooled median 0.9 s
    assert summary["vs"]["hf"] == pytest.approx((2.5 + 1.6) / 2)
    table = bench.markdown_table(rows) + bench.summary_table([summary])
    assert "| megatron-compile | bf16 | bf16 weights, fp32 masters | 5.0 |" in table
    assert "| bf16 | megatron-compile | bf16 weights, fp32 masters | 2.05x | 1.35x |  |" in table


def test_a_failed_run_is_a_row_not_an_error() -> None:
    opts = bench.parse_args([])
    row = bench.pool(opts, [bench.summarise(opts, {"path": "hf", "precision": "fp32", "error": "boom"})])
    assert "failed" in bench.markdown_table([row])
