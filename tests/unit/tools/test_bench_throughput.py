"""tools/bench_throughput.py without launching anything: log parsing, ZeRO accounting, rows, flags."""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

import bench_throughput as bench  # noqa: E402

LOG = """ > number of parameters on model parallel rank 0: 1000000
 iteration        1/       4 | elapsed time per iteration (ms): 900.0 | lm loss 9.0E+00 |
 iteration        2/       4 | elapsed time per iteration (ms): 100.0 | lm loss 8.9E+00 |
[after 1 iterations] memory (MB) | resident: 700.5
 iteration        3/       4 | elapsed time per iteration (ms): 200.0 | lm loss 8.8E+00 |
 iteration        4/       4 | elapsed time per iteration (ms): 300.0 | lm loss 8.7E+00 |
"""


def bench_args(**overrides: object) -> argparse.Namespace:
    args = argparse.Namespace(warmup_iters=1, cap_mb=1000.0, checkpoint_activations=False,
                              peak_per_rank=lambda config: 0.1)
    vars(args).update(overrides)
    return args


def test_parse_run_drops_warmup_and_applies_cap() -> None:
    run = bench.parse_run(LOG, 0, 4, bench_args(), None)
    assert run.fits and run.iteration_ms == [100.0, 200.0, 300.0]
    assert run.params_per_rank == 1_000_000 and run.steady_mb == 700.5
    # Peak per rank: wait4's ru_maxrss (KiB) on CPU, the log's max allocated on CUDA; 1200 MB either way.
    usage = resource.struct_rusage((0.0, 0.0, 1200 * 1024) + (0,) * 13)
    over = bench.parse_run(LOG + "| max allocated: 1200.0 |", 0, 4, bench_args(cap_mb=1000.0), usage)
    assert over.peak_mb == 1200.0 and not over.fits and over.error is None
    assert over.over_memory == "peak 1200 MB over the 1000 MB cap"
    oom = bench.parse_run(LOG + "torch.OutOfMemoryError: CUDA out of memory", 1, 4, bench_args(), None)
    assert not oom.fits and oom.over_memory == "out of memory" and oom.error is None
    failed = bench.parse_run(LOG + "error: something else\n", 2, 4, bench_args(), None)
    assert not failed.fits and failed.error == "exit 2: error: something else"


@pytest.mark.parametrize("path, dp, bytes_per_param", [
    ("baseline", 4, 20.0), ("zero1", 4, 4 + 12 / 4), ("zero2", 4, 2 + 14 / 4), ("zero3", 4, 16 / 4),
    ("zero2_offload", 2, 2 + 14 / 2)])
def test_model_states_follow_the_zero_paper(path: str, dp: int, bytes_per_param: float) -> None:
    config = bench.Config(path, "tiny", dp, 1, "bf16")
    assert bench.model_state_mb(config, 2**20) == pytest.approx(bytes_per_param)


def test_fp32_model_states() -> None:
    assert bench.model_state_mb(bench.Config("baseline", "tiny", 2, 2, "fp32"), 2**20) == 16.0
    assert bench.model_state_mb(bench.Config("zero2", "tiny", 2, 1, "fp32"), 2**20) == 4 + 12 / 2


def test_summarize_throughput_and_mfu() -> None:
    config = bench.Config("zero2", "tiny", 2, 1, "fp32")
    runs = [bench.Run(batch=4, fits=True, peak_mb=800.0, iteration_ms=[200.0, 200.0], params_per_rank=10)]
    row = bench.summarize(config, runs, bench_args())
    layers, hidden, _, seq, _ = bench.MODELS["tiny"]
    assert row["global_batch"] == 8 and row["samples_per_s"] == pytest.approx(40.0)
    flops = bench.model_flops_per_token(layers, hidden, seq, 8064)
    assert row["tflops_per_device"] == pytest.approx(40.0 * seq * flops / 2 / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.1)
    assert "| zero2 | tiny | fp32 | 1 | 2 | 4 | 8 | 40.00 |" in bench.markdown([row])


@pytest.mark.parametrize("argv, message", [
    (["--min-batch", "4", "--max-batch", "2"], "--min-batch (4) is above --max-batch (2)"),
    (["--memory-cap-mb", "0"], "--memory-cap-mb must be positive"),
    (["--models", "tiny", "--ranks", "2", "--mp", "3"], "no --mp size in [3]")])
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
