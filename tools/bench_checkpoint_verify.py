"""What checkpoint checksums cost: SHA-256 of a checkpoint's files against writing and reading them.

    python tools/bench_checkpoint_verify.py                    # GPT-2 124M with Adam state, 3 rounds
    python tools/bench_checkpoint_verify.py --params 20e6 --rounds 5 --dir /scratch

Every save writes a SHA-256 of each file into the ``complete`` marker, and every load verifies
it (``megatron/checkpoint/layout.py``: ``file_digest``). This measures that cost on a file shaped
like a Megatron-path checkpoint at ``--params`` parameters: fp32 weights plus Adam's two fp32
moments (12 bytes a parameter, 1.49 GB at 124M), one ``torch.save`` file, in ``--dir``.

Per round, in this order: ``torch.save`` + fsync (what a save costs without checksums), the
digest of the file just written (page cache warm: the save-time case), ``torch.load`` after the
file's pages are dropped with ``posix_fadvise(DONTNEED)`` (a load without verification on a fresh
node), the digest from a cold cache (verification reads the file first), and ``torch.load``
from the warm cache it leaves (the load that follows verification). Reports the median seconds, seconds per GB and the
digest as a share of the save and of the load. Prints a Markdown table and writes
``bench_out/bench_checkpoint_verify.json``. A benchmark: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron.checkpoint.layout import file_digest  # noqa: E402

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=124e6, help="model parameters (default GPT-2 124M)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the file (default: the system temp dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_checkpoint_verify.json"))
    args = parser.parse_args(argv)
    if not args.params >= 1e3:
        parser.error(f"--params must be at least 1000, got {args.params}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def checkpoint_like(params: int) -> dict:
    """fp32 weights and Adam's two moments, in layer-sized tensors (as a state dict holds them)."""
    chunk = 2_359_296  # one GPT-2 124M MLP weight (768 x 3072)
    sizes = [chunk] * (params // chunk) + ([params % chunk] if params % chunk else [])
    generator = torch.Generator().manual_seed(0)
    return {"model": [torch.randn(n, generator=generator) for n in sizes],
            "optimizer": {"exp_avg": [torch.randn(n, generator=generator) for n in sizes],
                          "exp_avg_sq": [torch.rand(n, generator=generator) for n in sizes]}}


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def save_synced(state: dict, path: str) -> None:
    torch.save(state, path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def drop_cache(path: str) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def digest_cold(path: str) -> None:
    drop_cache(path)
    file_digest(path)


def load_cold(path: str) -> None:
    drop_cache(path)
    torch.load(path, weights_only=True)


def measure(args: argparse.Namespace) -> dict:
    state = checkpoint_like(int(args.params))
    rows: dict[str, list[float]] = {"save": [], "digest_warm": [], "load_cold": [], "digest_cold": [],
                                    "load_warm": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        path = os.path.join(scratch, "model_optim_rng.pt")
        for _ in range(args.rounds):
            rows["save"].append(timed(lambda: save_synced(state, path)))
            rows["digest_warm"].append(timed(lambda: file_digest(path)))
            rows["load_cold"].append(timed(lambda: load_cold(path)))
            rows["digest_cold"].append(timed(lambda: digest_cold(path)))
            rows["load_warm"].append(timed(lambda: torch.load(path, weights_only=True)))
        size = os.path.getsize(path)
    return {"bytes": size, "seconds": {name: statistics.median(values) for name, values in rows.items()},
            "all_seconds": rows}


def markdown(result: dict, setup: str) -> str:
    seconds, gb = result["seconds"], result["bytes"] / GB
    lines = [f"Checkpoint checksum cost: {setup}", "",
             "| step | median s | s per GB | GB/s |", "|---|---|---|---|"]
    for name, value in seconds.items():
        lines.append(f"| {name} | {value:.2f} | {value / gb:.3f} | {gb / value:.2f} |")
    verified_load = seconds["digest_cold"] + seconds["load_warm"]
    lines += ["", f"save with checksums: {seconds['save'] + seconds['digest_warm']:.2f} s against {seconds['save']:.2f} "
              f"({seconds['digest_warm'] / seconds['save']:+.0%}); load from a cold cache with verification "
              f"(digest_cold + load_warm): {verified_load:.2f} s against {seconds['load_cold']:.2f} "
              f"({verified_load / seconds['load_cold'] - 1:+.0%})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    setup = (f"{int(args.params):,} parameters with Adam state, one file of {result['bytes'] / GB:.2f} GB in "
             f"{args.dir or tempfile.gettempdir()}, median of {args.rounds} rounds, SHA-256 (hashlib, "
             f"8 MiB reads), torch {torch.__version__}, {platform.machine()} {os.cpu_count()} CPUs")
    print(markdown(result, setup), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"setup": setup, "args": vars(args), **result}, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
