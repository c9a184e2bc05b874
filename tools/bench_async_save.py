"""What a checkpoint costs the training loop, synchronous against ``--async-save``.

    python tools/bench_async_save.py                       # GPT-2 124M shape, Megatron path and ZeRO 1, 2 rounds
    python tools/bench_async_save.py --paths megatron --rounds 3 --saves 4
    python tools/bench_async_save.py --threads 1             # leave a core to the background, as a GPU run does
    python tools/bench_async_save.py --warmup-saves 0        # count the run's first save too

Runs ``pretrain_gpt2.py`` on the demo corpus at the 124M shape (12 layers, hidden 768, 12 heads,
sequence 512; the demo vocabulary of 8000, so 92M parameters) on one rank, three ways per path:
no checkpoints, a checkpoint every ``--save-interval`` iterations written synchronously, and the
same with ``--async-save``. Each iteration's log line is timestamped as it arrives; the loop time
is from the first measured iteration's line to the last one's, and the loop time a save costs is

    (loop time with saves - loop time without) / saves in that span

so the background work's competition for the CPU counts, not only the time the step waits for the
copy. The span starts just before save ``--warmup-saves`` + 1 (by default the run's first save, which
also allocates the snapshot's host buffers, falls before it: the span shows the cost per save of a
long run; ``--warmup-saves 0`` counts it) and ends ``--save-interval`` iterations after its last
save, so that save's background work falls inside it. The three runs of a path alternate their order every round. Reports the
medians over rounds, the asynchronous cost as a share of the synchronous one (the issue's target:
at most 25%), and how long a background save took (from ``saving checkpoint`` to ``successfully
saved``); a background save still running when the span ends would hide part of its cost, so such
a run is refused with the advice to raise ``--save-interval``. ``--threads`` sets the training's
CPU threads: by default every core, so the background competes with training for every cycle; with
one core left free the background has the idle host cores it has next to a GPU. Prints a Markdown
table and writes ``bench_out/bench_async_save.json``. A benchmark: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "data", "demo")
SHAPE = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12", "--seq-length", "512",
         "--max-position-embeddings", "512"]
MODES = ("none", "sync", "async")
ITERATION = re.compile(r"^\s*iteration\s+(\d+)/")
SAVING = re.compile(r"^\s*saving checkpoint at iteration\s+(\d+) ")
SAVED = re.compile(r"^\s*successfully saved checkpoint at iteration\s+(\d+) ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=["megatron", "zero1"], choices=["megatron", "zero1"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save-interval", type=int, default=4)
    parser.add_argument("--saves", type=int, default=3, help="checkpoints inside the measured span")
    parser.add_argument("--warmup-saves", type=int, default=1,
                        help="checkpoints before the measured span (the first allocates the snapshot buffers)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="the training's CPU threads (OMP_NUM_THREADS; default: every core)")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: the system temp dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_async_save.json"))
    args = parser.parse_args(argv)
    for name in ("rounds", "save_interval", "saves", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_saves < 0:
        parser.error(f"--warmup-saves must be at least 0, got {args.warmup_saves}")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def span(args: argparse.Namespace) -> tuple[int, int]:
    """(first, last) measured iteration: from just before the first save after the warm-up saves to
    ``save_interval`` iterations after the last."""
    first = args.save_interval * (args.warmup_saves + 1) - 1
    return first, args.save_interval * (args.warmup_saves + args.saves + 1)


def command(args: argparse.Namespace, path: str, mode: str, save: str, ds_config: str) -> list[str]:
    first, last = span(args)
    cmd = [sys.executable, "pretrain_gpt2.py", *SHAPE, "--batch-size", str(args.batch_size),
           "--train-iters", str(last), "--lr-decay-iters", str(last), "--log-interval", "1",
           "--eval-interval", "100000", "--eval-iters", "0", "--num-workers", "0", "--train-data", "demo",
           "--demo-data-dir", DEMO, "--vocab-file", os.path.join(DEMO, "gpt2-vocab.json"),
           "--merge-file", os.path.join(DEMO, "gpt2-merges.txt"), "--progress-timeout-minutes", "0"]
    if mode != "none":
        # The final save (at the last iteration) falls after the span's last line.
        cmd += ["--save", save, "--save-interval", str(args.save_interval)]
    if mode == "async":
        cmd.append("--async-save")
    if path == "zero1":
        cmd += ["--deepspeed", "--deepspeed_config", ds_config]
    return cmd


def timed_run(args: argparse.Namespace, path: str, mode: str, scratch: str,
              ds_config: str) -> tuple[float, list[float]]:
    """(loop seconds over the span, seconds each save in the span took from announcement to done)."""
    save = os.path.join(scratch, f"{path}-{mode}")
    shutil.rmtree(save, ignore_errors=True)
    first, last = span(args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(command(args, path, mode, save, ds_config), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stamps: dict[int, float] = {}
    saving: dict[int, float] = {}
    saved: dict[int, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        now = time.perf_counter()
        tail = (tail + [line])[-30:]
        for pattern, found in ((ITERATION, stamps), (SAVING, saving), (SAVED, saved)):
            match = pattern.match(line)
            if match:
                found[int(match.group(1))] = now
    proc.wait()
    shutil.rmtree(save, ignore_errors=True)
    if proc.returncode != 0 or first not in stamps or last not in stamps:
        sys.exit(f"error: the {path} run ({mode}) failed (exit {proc.returncode}):\n{''.join(tail)}")
    in_span = [iteration for iteration in saving if first <= iteration < last]
    late = [iteration for iteration in in_span if saved.get(iteration, float("inf")) > stamps[last]]
    if late:
        sys.exit(f"error: the {path} {mode} save at iteration {late[0]} was still being written when the measured "
                 f"span ended, so part of its cost would not be measured: raise --save-interval "
                 f"(now {args.save_interval})")
    return stamps[last] - stamps[first], [saved[iteration] - saving[iteration] for iteration in in_span]


def measure(args: argparse.Namespace, scratch: str) -> dict:
    ds_config = os.path.join(scratch, "zero1.json")
    with open(ds_config, "w") as handle:
        json.dump({"zero_optimization": {"stage": 1}}, handle)
    results: dict[str, dict[str, list[float]]] = {path: {mode: [] for mode in MODES} for path in args.paths}
    durations: dict[str, dict[str, list[float]]] = {path: {mode: [] for mode in MODES} for path in args.paths}
    for round_index in range(args.rounds):
        for path in args.paths:
            order = MODES if round_index % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                seconds, saves = timed_run(args, path, mode, scratch, ds_config)
                results[path][mode].append(seconds)
                durations[path][mode] += saves
                print(f"round {round_index + 1} {path} {mode}: loop {seconds:.2f} s"
                      + (f", saves took {', '.join(f'{s:.1f}' for s in saves)} s" if saves else ""), flush=True)
    return {"loop": results, "save_seconds": durations}


def summary(measured: dict, saves: int) -> dict[str, dict[str, float]]:
    table = {}
    for path, runs in measured["loop"].items():
        loop = {mode: statistics.median(values) for mode, values in runs.items()}
        sync = (loop["sync"] - loop["none"]) / saves
        asynchronous = (loop["async"] - loop["none"]) / saves
        table[path] = {"loop_none_s": loop["none"], "loop_sync_s": loop["sync"], "loop_async_s": loop["async"],
                       "sync_cost_per_save_s": sync, "async_cost_per_save_s": asynchronous,
                       "async_share_of_sync": asynchronous / sync if sync > 0 else float("nan"),
                       "sync_save_s": statistics.median(measured["save_seconds"][path]["sync"]),
                       "async_save_s": statistics.median(measured["save_seconds"][path]["async"])}
    return table


def markdown(table: dict[str, dict[str, float]], setup: str) -> str:
    lines = [f"Checkpoint cost to the training loop: {setup}", "",
             "| path | loop s, no saves | loop s, sync saves | loop s, async saves | sync s per save | "
             "async s per save | async / sync | a sync save takes s | a background save takes s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path, row in table.items():
        lines.append(f"| {path} | {row['loop_none_s']:.2f} | {row['loop_sync_s']:.2f} | {row['loop_async_s']:.2f} | "
                     f"{row['sync_cost_per_save_s']:.2f} | {row['async_cost_per_save_s']:.2f} | "
                     f"{row['async_share_of_sync']:.0%} | {row['sync_save_s']:.1f} | {row['async_save_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(DEMO, "gpt2-vocab.json")):
        subprocess.run([sys.executable, "tools/build_demo_corpus.py"], cwd=REPO, check=True)
    first, last = span(args)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        results = measure(args, scratch)
    table = summary(results, args.saves)
    setup = (f"12 layers, hidden 768, 12 heads, sequence 512, micro batch {args.batch_size}, demo vocabulary, fp32, "
             f"one rank, {args.threads} training thread(s) on {os.cpu_count()} CPUs; a save every {args.save_interval} iterations, {args.saves} saves in the measured span "
             f"(iterations {first}-{last}, after {args.warmup_saves} warm-up save(s)); median of {args.rounds} rounds, modes alternating; checkpoints in "
             f"{args.dir or tempfile.gettempdir()}; {platform.machine()}")
    print(markdown(table, setup), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"setup": setup, "args": vars(args), "loop_seconds": results["loop"],
                   "save_seconds": results["save_seconds"], "summary": table}, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
