"""Training throughput, baseline Megatron vs DeepSpeed ZeRO, at the largest micro batch that fits.

    python tools/bench_throughput.py                      # the small CPU matrix (a few minutes, 2 cores)
    python tools/bench_throughput.py --models 124M 345M --ranks 8 --mp 1 2 4 --precisions bf16 \\
        --paths baseline zero1 zero2 zero3 --max-batch 64  # GPUs

Every measurement is a fresh ``torchrun pretrain_gpt2.py`` on the demo corpus (the real entry
point: same model, data loader, optimizer and DeepSpeed seam as training). For each model x
ranks x precision x path (baseline, zero1, zero2, zero3, zero2_offload) the model-parallel sizes
of ``--mp`` are tried from the smallest; the first that fits is kept, with the largest micro
batch that fits: it runs ``--min-batch`` and twice that, extrapolates peak memory linearly in the
batch to ``--memory-cap-mb`` and bisects down until a run fits (a run fits when it exits cleanly
and its peak memory per rank, CPU RSS or CUDA max allocated, is within the cap; a CUDA
out-of-memory also means it does not fit). The first ``--warmup-iters`` iterations of every run
are discarded. FLOPs come from ``megatron.training.flops``; on CPU the per-rank peak is a matmul measured
here with one rank's threads, scaled by the share of cores a rank gets when ranks outnumber cores.

Writes ``OUT/throughput.json``, ``OUT/throughput.md`` (the tables also go to stdout),
``OUT/throughput.png`` and ``OUT/memory_per_rank.png``. Timings are what they are: nothing here
fails on a number. A configuration that errors is reported and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron.launch import free_port  # noqa: E402
from megatron.mpu.utils import pad_vocab_size  # noqa: E402
from megatron.training.flops import (  # noqa: E402
    device_peak_tflops,
    hardware_flops_per_token,
    model_flops_per_token,
    utilization,
)

DEMO = os.path.join(REPO, "data", "demo")
# name: (layers, hidden, heads, sequence, vocabulary before padding)
MODELS = {
    "tiny": (4, 256, 8, 128, 8000), "small": (8, 512, 8, 64, 8000),
    "124M": (12, 768, 12, 1024, 50257), "345M": (24, 1024, 16, 1024, 50257),
    "1.5B": (48, 1600, 16, 1024, 50257),
}
DS_CONFIGS = {"zero1": "ds_zero1_config.json", "zero2": "ds_zero2_config.json",
              "zero3": "ds_zero3_config.json", "zero2_offload": "ds_zero2_offload_config.json"}
PATHS = ["baseline", *DS_CONFIGS]
STAGE = {"baseline": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero2_offload": 2}
ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| elapsed time per iteration \(ms\): ([\d.]+)")
PARAMS_RE = re.compile(r"number of parameters on model parallel rank \d+: (\d+)")
CUDA_MEM_RE = re.compile(r"max allocated: ([\d.]+)")
STEADY_MEM_RE = re.compile(r"memory \(MB\) \| (?:resident|allocated): ([\d.]+)")
OOM_RE = re.compile(r"out of memory|OutOfMemoryError|Killed|SIGKILL|signal 9", re.IGNORECASE)


class BenchError(ValueError):
    """A bad benchmark flag; main prints it on one line and exits 2."""


@dataclass(frozen=True)
class Config:
    path: str
    model: str
    ranks: int
    mp: int
    precision: str
    pp: int = 1  # pipeline stages (DeepSpeed's pipeline engine, ZeRO 0/1 only)

    @property
    def dp(self) -> int:
        return self.ranks // (self.mp * self.pp)

    @property
    def micro_batches(self) -> int:
        """Micro batches per step: enough to fill the pipeline (1 without pipelining)."""
        return 2 * self.pp if self.pp > 1 else 1

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return MODELS[self.model]

    def label(self) -> str:
        pipe = f" pp{self.pp}" if self.pp > 1 else ""
        return f"{self.path} {self.model}{pipe} mp{self.mp} dp{self.dp} {self.precision}"


@dataclass
class Run:
    """One launch at one micro batch: fits, timings of the kept iterations, peak memory per rank."""
    batch: int
    fits: bool
    peak_mb: float | None = None
    steady_mb: float | None = None  # rank 0 after the first logged iteration (RSS or CUDA allocated)
    iteration_ms: list[float] = field(default_factory=list)
    params_per_rank: int | None = None
    over_memory: str | None = None  # why it does not fit: out of memory or over the cap
    error: str | None = None  # any other failure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4],
                        help="world sizes; paired one-to-one with --models when the counts match, else crossed")
    parser.add_argument("--mp", nargs="+", type=int, default=[1, 2], help="model-parallel sizes to try, smallest first")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    parser.add_argument("--pipe", nargs="+", type=int, default=[1],
                        help="pipeline sizes (above 1: DeepSpeed's pipeline engine, only with zero1)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--memory-cap-mb", type=float, default=None,
                        help="peak memory per rank allowed (default: 1200 on CPU, the device's memory on CUDA)")
    parser.add_argument("--warmup-iters", type=int, default=1, help="iterations discarded from every run")
    parser.add_argument("--timed-iters", type=int, default=3, help="iterations timed in every run")
    parser.add_argument("--checkpoint-activations", action="store_true", help="recompute (counted in HFU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak per device (default: table or measured)")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "bench_out", "throughput"))
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per launch")
    args = parser.parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Reject flags that cannot run, before anything is launched. Raises BenchError."""
    for name in ("min_batch", "max_batch", "timed_iters", "timeout"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_iters < 0:
        raise BenchError(f"--warmup-iters must be >= 0, got {args.warmup_iters}")
    if args.min_batch > args.max_batch:
        raise BenchError(f"--min-batch ({args.min_batch}) is above --max-batch ({args.max_batch}); lower it")
    if args.memory_cap_mb is not None and args.memory_cap_mb <= 0:
        raise BenchError(f"--memory-cap-mb must be positive, got {args.memory_cap_mb}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise BenchError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else None
    for ranks in args.ranks:
        if ranks < 1 or (devices is not None and ranks > devices):
            raise BenchError(f"--ranks {ranks} is not between 1 and the {devices or 'any'} devices here; lower it")
    if not torch.cuda.is_available() and "fp16" in args.precisions:
        raise BenchError("--precisions fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    for model in args.models:
        heads = MODELS[model][2]
        if not any(heads % mp == 0 and any(r % mp == 0 for r in args.ranks) for mp in args.mp):
            raise BenchError(f"no --mp size in {args.mp} divides both the {heads} heads of {model} and a --ranks "
                             f"size in {args.ranks}; add --mp 1")


def matrix(args: argparse.Namespace) -> list[list[Config]]:
    """Groups of configurations, one group per (path, model, ranks, precision), smallest mp first."""
    pairs = (list(zip(args.models, args.ranks)) if len(args.models) == len(args.ranks)
             else [(m, r) for m in args.models for r in args.ranks])
    groups = []
    for model, ranks in pairs:
        for precision in args.precisions:
            for path in args.paths:
                for pp in sorted(args.pipe):
                    if pp > 1 and path != "zero1":
                        continue  # pipelining runs on the DeepSpeed path with ZeRO 0/1
                    group = [Config(path, model, ranks, mp, precision, pp) for mp in sorted(args.mp)
                             if ranks % (mp * pp) == 0 and MODELS[model][2] % mp == 0
                             and MODELS[model][0] >= pp]
                    if group:
                        groups.append(group)
    return groups


def threads_per_rank(ranks: int) -> int:
    return 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // ranks)


def training_argv(config: Config, batch: int, args: argparse.Namespace, run_dir: str) -> list[str]:
    """Flags of ``pretrain_gpt2.py`` for one run: no checkpoints, no evaluation, a log line per iteration."""
    layers, hidden, heads, seq, vocab = config.shape
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--vocab-size", str(vocab),
            "--batch-size", str(batch), "--train-iters", str(args.warmup_iters + args.timed_iters),
            "--model-parallel-size", str(config.mp), "--lr", "1e-4", "--log-interval", "1",
            "--eval-iters", "0", "--num-workers", "0", "--train-data", "demo",
            "--vocab-file", os.path.join(DEMO, "gpt2-vocab.json"), "--merge-file", os.path.join(DEMO, "gpt2-merges.txt"),
            "--demo-data-dir", DEMO, "--exp-dir", run_dir]
    if config.precision != "fp32":
        argv.append(f"--{config.precision}")
    if args.checkpoint_activations:
        argv.append("--checkpoint-activations")
    if config.path != "baseline":
        argv += ["--deepspeed", "--deepspeed_config", os.path.join(REPO, "scripts", DS_CONFIGS[config.path])]
    if config.pp > 1:
        argv += ["--pipe-parallel-size", str(config.pp), "--gradient-accumulation-steps", str(config.micro_batches)]
    return argv


def launch(config: Config, batch: int, args: argparse.Namespace) -> Run:
    """One torchrun job; peak memory per rank is CUDA max allocated (rank 0's) or the largest rank's RSS."""
    run_dir = os.path.join(args.output_dir, "runs", config.label().replace(" ", "_") + f"_b{batch}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(config.ranks),
               "--master_port", str(free_port()), os.path.join(REPO, "pretrain_gpt2.py"),
               *training_argv(config, batch, args, run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank(config.ranks)), PYTHONUNBUFFERED="1")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "log.txt"), "w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        timer = threading.Timer(args.timeout, os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
        # wait4's rusage covers torchrun and the ranks it reaped: ru_maxrss is the largest one's peak.
        _, status, usage = os.wait4(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    return parse_run(output, process.returncode, batch, args, usage)


def parse_run(output: str, returncode: int, batch: int, args: argparse.Namespace,
              usage: resource.struct_rusage | None) -> Run:
    """Turn a run's log into a Run; iterations up to ``--warmup-iters`` are dropped."""
    params = PARAMS_RE.search(output)
    steady = STEADY_MEM_RE.search(output)
    run = Run(batch, fits=returncode == 0, params_per_rank=int(params.group(1)) if params else None,
              steady_mb=float(steady.group(1)) if steady else None)
    if torch.cuda.is_available():
        memory = CUDA_MEM_RE.search(output)
        run.peak_mb = float(memory.group(1)) if memory else None
    elif usage is not None:
        run.peak_mb = usage.ru_maxrss / 1024.0
    run.iteration_ms = [float(ms) for it, ms in ITER_RE.findall(output) if int(it) > args.warmup_iters]
    if returncode != 0 and OOM_RE.search(output):
        run.over_memory = "out of memory"
    elif returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        run.error = f"exit {returncode}: " + (lines[-1][:300] if lines else "no output")
    elif args.cap_mb is not None and run.peak_mb is not None and run.peak_mb > args.cap_mb:
        run.fits, run.over_memory = False, f"peak {run.peak_mb:.0f} MB over the {args.cap_mb:.0f} MB cap"
    return run


def largest_batch(config: Config, args: argparse.Namespace) -> list[Run]:
    """Runs tried for one configuration, top down: ``--max-batch`` first (one launch when it fits).

    Otherwise ``--min-batch``, then the batch where peak memory, linear in the batch through those
    two runs, meets the cap, halving the distance down to the last fitting batch while a run does not fit.
    """
    top = launch(config, args.max_batch, args)
    runs = [top]
    if top.fits or top.error or args.min_batch == args.max_batch:
        return runs
    low = launch(config, args.min_batch, args)
    runs.append(low)
    if not low.fits:
        return runs
    high = args.max_batch - 1
    if args.cap_mb and top.peak_mb and low.peak_mb and top.peak_mb > low.peak_mb:
        per_sample = (top.peak_mb - low.peak_mb) / (top.batch - low.batch)
        high = min(high, low.batch + int((args.cap_mb - low.peak_mb) / per_sample))
    while high > low.batch:
        run = launch(config, high, args)
        runs.append(run)
        if run.fits or run.error:
            break
        high = low.batch + (high - low.batch) // 2
    return runs


def summarize(config: Config, runs: list[Run], args: argparse.Namespace) -> dict:
    """One JSON row: the best fitting run's throughput, FLOPs, utilisation and memory."""
    row: dict = {**asdict(config), "dp": config.dp, "runs": [asdict(r) for r in runs]}
    layers, hidden, heads, seq, vocab = config.shape
    row.update(layers=layers, hidden=hidden, heads=heads, seq_length=seq,
               padded_vocab=pad_vocab_size(vocab, 128, config.mp))
    fitting = [r for r in runs if r.fits and r.iteration_ms]
    row["fits"] = bool(fitting)
    row["error"] = next((r.error for r in runs if r.error), None)
    row["over_memory"] = next((r.over_memory for r in runs if r.over_memory), None)
    if not fitting:
        return row
    best = max(fitting, key=lambda r: r.batch)
    seconds = sum(best.iteration_ms) / len(best.iteration_ms) / 1000.0
    global_batch = best.batch * config.dp * config.micro_batches
    tokens_per_s = global_batch * seq / seconds
    model_flops = model_flops_per_token(layers, hidden, seq, row["padded_vocab"])
    hw_flops = hardware_flops_per_token(layers, hidden, seq, row["padded_vocab"], args.checkpoint_activations)
    peak = args.peak_per_rank(config)
    row.update(micro_batch=best.batch, global_batch=global_batch, iteration_ms=seconds * 1000.0,
               samples_per_s=global_batch / seconds, tokens_per_s=tokens_per_s,
               tflops_per_device=tokens_per_s * model_flops / config.ranks / 1e12, peak_tflops=peak,
               mfu=utilization(tokens_per_s, model_flops, config.ranks, peak),
               hfu=utilization(tokens_per_s, hw_flops, config.ranks, peak),
               peak_mb_per_rank=best.peak_mb, steady_mb_rank0=best.steady_mb, params_per_rank=best.params_per_rank,
               model_state_mb_per_rank=model_state_mb(config, best.params_per_rank))
    return row


def model_state_mb(config: Config, params_per_rank: int | None) -> float | None:
    """ZeRO paper accounting for Adam: params P, grads G, optimizer O bytes/param, O and G split over dp.

    fp32: P=4, G=4, O=8 (moments). bf16/fp16: P=2, G=2, O=12 (fp32 master weights and moments);
    the baseline's fp16 optimizer also keeps fp32 master gradients (+4). Offload moves O to host
    memory, counted here too (on CPU it is the same memory).
    """
    if params_per_rank is None:
        return None
    p, g, o = (4, 4, 8) if config.precision == "fp32" else (2, 2, 12)
    if config.path == "baseline" and config.precision != "fp32":
        o += 4
    n = config.dp
    per_param = {0: p + g + o, 1: p + g + o / n, 2: p + (g + o) / n, 3: (p + g + o) / n}[STAGE[config.path]]
    return per_param * params_per_rank / 2**20


def measure_peaks(args: argparse.Namespace) -> None:
    """Set ``args.peak_per_rank(config)``: flag, GPU table, or a CPU matmul (one rank's threads) measured once."""
    cache: dict[tuple[str, int], float] = {}

    def peak(config: Config) -> float:
        key = (config.precision, config.ranks)
        if key not in cache:
            if torch.cuda.is_available() or args.peak_tflops:
                cache[key] = device_peak_tflops(config.precision, args.peak_tflops)[0]
            else:
                threads = threads_per_rank(config.ranks)
                torch.set_num_threads(threads)
                share = min(1.0, (os.cpu_count() or 1) / (threads * config.ranks))
                cache[key] = device_peak_tflops(config.precision)[0] * share
        return cache[key]

    args.peak_per_rank = peak


def markdown(rows: list[dict]) -> str:
    """The tutorial's two tables side by side (best DeepSpeed path per model), then every row."""
    head = "| model | MP | DP | #devices | batch size | layers | hidden size | attention heads | samples / sec |"
    out = []
    for title, paths in (("a) Megatron-LM GPT-2 baseline", ["baseline"]),
                         ("b) Megatron-LM GPT-2 with DeepSpeed (best ZeRO path)", list(DS_CONFIGS))):
        out += [f"**{title}**", "", head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in best_rows(rows, paths):
            out.append(f"| {row['model']} | {row['mp']} | {row['dp']} | {row['ranks']} | {row['global_batch']} | "
                       f"{row['layers']} | {row['hidden']} | {row['heads']} | {row['samples_per_s']:.2f} |")
        out.append("")
    out += ["**Every configuration** (speed-up: samples/s over the baseline of the same model, devices, precision)", "",
            "| path | model | precision | MP | DP | micro batch | global batch | samples/s | tokens/s | TFLOP/s/device "
            "| MFU | HFU | peak MB/rank | model states MB/rank (ZeRO) | speed-up |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(detail_line(row, baseline_for(rows, row)))
    return "\n".join(out) + "\n"


def best_rows(rows: list[dict], paths: list[str]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["model"], row["ranks"], row["precision"])
        if row["path"] in paths and row["fits"] and row["samples_per_s"] > best.get(key, {}).get("samples_per_s", -1):
            best[key] = row
    return list(best.values())


def baseline_for(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["path"] == "baseline" and r["fits"] and
                 (r["model"], r["ranks"], r["precision"]) == (row["model"], row["ranks"], row["precision"])), None)


def detail_line(row: dict, baseline: dict | None) -> str:
    path = row["path"] + (f" + pipe {row['pp']}" if row.get("pp", 1) > 1 else "")
    cells = [path, row["model"], row["precision"], str(row["mp"]), str(row["dp"])]
    if not row["fits"]:
        reason = row["error"] or f"does not fit: {row['over_memory']}"
        return "| " + " | ".join(cells + [f"— ({reason})"] + [""] * 9) + " |"

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    speedup = f"{row['samples_per_s'] / baseline['samples_per_s']:.2f}x" if baseline else "n/a"
    state = "n/a" if row["model_state_mb_per_rank"] is None else f"{row['model_state_mb_per_rank']:.0f}"
    cells += [str(row["micro_batch"]), str(row["global_batch"]), f"{row['samples_per_s']:.2f}",
              f"{row['tokens_per_s']:.0f}", f"{row['tflops_per_device']:.4f}", pct(row["mfu"]), pct(row["hfu"]),
              f"{row['peak_mb_per_rank']:.0f}", state, speedup]
    return "| " + " | ".join(cells) + " |"


def plot(rows: list[dict], out_dir: str, cap_mb: float | None) -> None:
    """throughput.png: samples/s per path, grouped by model/devices; memory_per_rank.png: measured vs ZeRO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["ranks"], r["precision"]) for r in rows}, key=str)
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    width = 0.8 / len(paths)
    figures = {name: plt.subplots(figsize=(max(8, 3.5 * len(groups)), 5)) for name in ("throughput", "memory")}
    for index, path in enumerate(paths):
        found = [next((r for r in rows if (r["model"], r["ranks"], r["precision"]) == g and r["path"] == path
                       and r["fits"]), None) for g in groups]
        xs = [g + (index - (len(paths) - 1) / 2) * width for g in range(len(groups))]
        _throughput_bars(figures["throughput"][1], rows, found, xs, width, path)
        _memory_bars(figures["memory"][1], found, xs, width, path, index)
    names = [f"{m}, {r} ranks, {p}" for m, r, p in groups]
    titles = {"throughput": ("Throughput at the largest micro batch that fits\n(annotated: mp, micro batch, "
                             "speed-up over the baseline)", "samples / s"),
              "memory": ("Peak memory per rank: measured (light) vs ZeRO model-state accounting (hatched)",
                         "MB per rank")}
    for name, (fig, ax) in figures.items():
        ax.set_xticks(range(len(groups)), names)
        ax.margins(y=0.15)  # room for the annotations
        ax.set_title(titles[name][0])
        ax.set_ylabel(titles[name][1])
        if name == "memory" and cap_mb:
            ax.axhline(cap_mb, color="red", linestyle="--", label=f"memory cap {cap_mb:.0f} MB")
        if name == "memory":  # many entries: below the axes, not over the bars
            ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
        else:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "throughput.png" if name == "throughput" else "memory_per_rank.png"),
                    dpi=110)
        plt.close(fig)


def _throughput_bars(ax, rows: list[dict], found: list[dict | None], xs: list[float], width: float,
                     path: str) -> None:
    bars = ax.bar(xs, [r["samples_per_s"] if r else 0.0 for r in found], width, label=path)
    for bar, row in zip(bars, found):
        text = f"mp{row['mp']} b{row['micro_batch']}" if row else "no fit"
        base = baseline_for(rows, row) if row else None
        if base and row is not base:
            text += f"\n{row['samples_per_s'] / base['samples_per_s']:.2f}x"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)


def _memory_bars(ax, found: list[dict | None], xs: list[float], width: float, path: str, index: int) -> None:
    ax.bar(xs, [r["peak_mb_per_rank"] or 0.0 if r else 0.0 for r in found], width, alpha=0.45,
           color=f"C{index}", label=f"{path}: measured peak")
    ax.bar(xs, [r["model_state_mb_per_rank"] or 0.0 if r else 0.0 for r in found], width * 0.6,
           color=f"C{index}", hatch="//", edgecolor="black", label=f"{path}: model states (formula)")


def run_matrix(args: argparse.Namespace) -> list[dict]:
    """Measure every group: its smallest fitting mp at its largest fitting batch (or a no-fit row)."""
    rows = []
    for group in matrix(args):
        row, tried = None, []
        for config in group:
            started = time.perf_counter()
            row = summarize(config, largest_batch(config, args), args)
            status = f"micro batch {row['micro_batch']}, {row['samples_per_s']:.2f} samples/s" if row["fits"] else \
                (row["error"] or "does not fit")
            print(f"{config.label():<40} {status} ({time.perf_counter() - started:.0f} s)", flush=True)
            if row["fits"] or row["error"]:
                break
            tried.append({"mp": config.mp, "over_memory": row["over_memory"], "runs": row["runs"]})
        row["smaller_mp_tried"] = tried
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    default_cap = None if torch.cuda.is_available() else 1200.0
    if torch.cuda.is_available():
        default_cap = torch.cuda.get_device_properties(0).total_memory / 2**20
    args.cap_mb = args.memory_cap_mb or default_cap
    os.makedirs(args.output_dir, exist_ok=True)
    from megatron.data.demo import ensure_demo_corpus

    ensure_demo_corpus(DEMO)  # once here, not raced by the first run's ranks
    measure_peaks(args)
    started = time.perf_counter()
    rows = run_matrix(args)
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "memory_cap_mb": args.cap_mb,
              "warmup_iters": args.warmup_iters, "timed_iters": args.timed_iters,
              "checkpoint_activations": args.checkpoint_activations, "seconds": time.perf_counter() - started,
              "rows": rows}
    table = markdown(rows)
    print("\n" + table)
    with open(os.path.join(args.output_dir, "throughput.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(args.output_dir, "throughput.md"), "w") as handle:
        handle.write(table)
    plot(rows, args.output_dir, args.cap_mb)
    print(f"wrote {args.output_dir}/throughput.{{json,md,png}} in {report['seconds']:.0f} s")
    failed = [r for r in rows if r["error"] and not r["fits"]]
    for row in failed:
        print(f"error: {row['path']} {row['model']} failed: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
