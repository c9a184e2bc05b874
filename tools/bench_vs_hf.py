"""One training step of this project's GPT-2 against Hugging Face's ``GPT2LMHeadModel``, side by side.

    python tools/bench_vs_hf.py                      # 4 layers, hidden 256, seq 256, batch 8, vocab 50257
    python tools/bench_vs_hf.py --precisions bf16 --paths megatron hf --steps 8

Same GPT-2 configuration, same random token batches (fixed seed), same machine, one invocation.
Each (path, precision) runs in a fresh child process, so one path's memory (or allocator state)
cannot speed up or slow down another. Paths:

* ``megatron``: ``MegatronBackend`` (fp32, or ``--bf16``/``--fp16``: half model + fp32 masters);
* ``megatron-compile``: the same with ``--compile`` (torch.compile'd transformer layers; the
  compilation falls in the discarded warm-up steps);
* ``deepspeed-zero0``/``deepspeed-zero1``: ``DeepSpeedBackend`` with ZeRO 0/1 on one rank;
* ``hf``: ``transformers.GPT2LMHeadModel`` (SDPA attention) with ``torch.optim.AdamW``, gradient
  clipping at 1.0 as the HF Trainer does, and ``torch.autocast`` for bf16/fp16.

All the project's paths are built as ``megatron/training/loop.py`` builds them (single-rank gloo group,
``mpu.initialize_model_parallel(1)``, ``pretrain_gpt2.model_provider``/``forward_step``). Reports
tokens/s (median over the timed steps, warm-up discarded), model TFLOP/s
(``megatron.training.flops.model_flops_per_token``), MFU against a known GPU's data-sheet peak (else a
matmul peak measured on the spot for each precision), and the ratio to Hugging Face in the same
precision. Prints a Markdown table and writes ``bench_out/bench_vs_hf.json``. A benchmark: it
never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron.training.flops import model_flops_per_token, table_peak_tflops  # noqa: E402

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("megatron", "megatron-compile", "deepspeed-zero0", "deepspeed-zero1", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps run and discarded first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sweep, paths interleaved (pooled steps; ratio = median of rounds)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="default: fp32 bf16 (and fp16 when a GPU is present)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_vs_hf.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON: one (path, precision)
    args = parser.parse_args(argv)
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    bad = [p for p in args.precisions if p not in ("fp32", "bf16", "fp16")]
    if bad:
        raise SystemExit(f"unknown precision(s) {bad}: choose from fp32 bf16 fp16")
    if "fp16" in args.precisions and not torch.cuda.is_available():
        raise SystemExit("fp16 needs a GPU (DeepSpeed and autocast fp16 matmuls); drop it on CPU")
    return args


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_tflops(precision: str, size: int = 2048, seconds: float = 1.0) -> float:
    """Best TFLOP/s of square ``size`` matmuls in ``precision`` on this device, this process's threads."""
    dtype = HALF.get(precision, torch.float32)
    a = torch.randn(size, size, device=device()).to(dtype)
    b = torch.randn(size, size, device=device()).to(dtype)
    out = torch.empty(size, size, device=device(), dtype=dtype)
    torch.matmul(a, b, out=out)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        synchronize()
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize()
        best = max(best, 2 * size**3 / max(time.perf_counter() - start, 1e-9))
    return best / 1e12


def peak_tflops(precision: str) -> tuple[float, str]:
    """The data-sheet peak of a known GPU (what MFU is quoted against), else a measured matmul."""
    if torch.cuda.is_available():
        table = table_peak_tflops(torch.cuda.get_device_name(), precision)
        if table:
            return table, "data sheet"
    return matmul_peak_tflops(precision), "measured matmul"


def token_batches(opts: argparse.Namespace, count: int) -> list[torch.Tensor]:
    """``count`` batches of ``seq + 1`` random token ids (inputs + shifted labels), fixed seed."""
    generator = torch.Generator().manual_seed(opts.seed)
    return [torch.randint(0, opts.vocab_size, (opts.batch_size, opts.seq_length + 1), generator=generator)
            for _ in range(count)]


def time_steps(step: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], warmup: int) -> list[float]:
    """Seconds per step for the batches after the first ``warmup`` ones."""
    times = []
    for index, batch in enumerate(batches):
        synchronize()
        start = time.perf_counter()
        step(batch)
        synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def megatron_run_config(opts: argparse.Namespace, precision: str, path: str, config_dir: str) -> Any:
    """The ``RunConfig`` of one project path (flags checked as ``arguments.py`` checks them, without
    the data checks: batches are fed directly, no corpus is read)."""
    import arguments

    argv = ["--num-layers", str(opts.num_layers), "--hidden-size", str(opts.hidden_size),
            "--num-attention-heads", str(opts.num_attention_heads), "--seq-length", str(opts.seq_length),
            "--max-position-embeddings", str(opts.seq_length), "--batch-size", str(opts.batch_size),
            "--vocab-size", str(opts.vocab_size), "--seed", str(opts.seed), "--lr", "1e-4",
            "--train-iters", "1000", "--distributed-backend", "nccl" if torch.cuda.is_available() else "gloo"]
    if precision != "fp32":
        argv.append(f"--{precision}")
    if precision == "fp16":
        argv += ["--loss-scale", "1024"]  # static: no skipped steps in a timing
    if path == "megatron-compile":
        argv.append("--compile")
    if path.startswith("deepspeed"):
        config = os.path.join(config_dir, "ds_config.json")
        with open(config, "w") as handle:
            json.dump({"zero_optimization": {"stage": int(path[-1])}}, handle)
        argv += ["--deepspeed", "--deepspeed_config", config]
    args = arguments.build_parser().parse_args(argv)
    for validate in (arguments.validate_model_args, arguments.validate_training_args,
                     arguments.validate_deepspeed_args):
        validate(args)
    return arguments.build_run_config(args, vocab_size=opts.vocab_size, eod_token=opts.vocab_size - 1)


def run_megatron(opts: argparse.Namespace, precision: str, path: str) -> list[float]:
    """The training step of ``megatron/training/loop.py`` (``backend.train_step``) on one rank."""
    import pretrain_gpt2
    from megatron.backends import build_backend
    from megatron.launch import initialize_megatron

    with tempfile.TemporaryDirectory() as config_dir:
        run = megatron_run_config(opts, precision, path, config_dir)
        initialize_megatron(run.parallel, run.training.seed)
        backend = build_backend(pretrain_gpt2.model_provider(run), run, pretrain_gpt2.forward_step)
    backend.train()

    def step(batch: torch.Tensor) -> None:
        backend.train_step(iter([{"text": batch}]))

    batches = token_batches(opts, opts.warmup_steps + opts.steps)
    return time_steps(step, batches, opts.warmup_steps)


def run_hf(opts: argparse.Namespace, precision: str) -> list[float]:
    """``GPT2LMHeadModel`` + ``torch.optim.AdamW``; bf16/fp16 through autocast, fp32 weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(opts.seed)
    config = GPT2Config(vocab_size=opts.vocab_size, n_positions=opts.seq_length, n_embd=opts.hidden_size,
                        n_layer=opts.num_layers, n_head=opts.num_attention_heads)
    model = GPT2LMHeadModel(config).to(device()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device().type, enabled=precision == "fp16")
    autocast = torch.autocast(device().type, dtype=HALF.get(precision, torch.float32),
                              enabled=precision != "fp32")

    def step(batch: torch.Tensor) -> None:
        tokens = batch[:, :-1].to(device())
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    batches = token_batches(opts, opts.warmup_steps + opts.steps)
    return time_steps(step, batches, opts.warmup_steps)


def run_child(opts: argparse.Namespace) -> None:
    spec = json.loads(opts.child)
    path, precision = spec["path"], spec["precision"]
    peak, source = peak_tflops(precision)
    times = run_hf(opts, precision) if path == "hf" else run_megatron(opts, precision, path)
    print("RESULT " + json.dumps({"path": path, "precision": precision, "step_s": times, "peak_tflops": peak,
                                  "peak_source": source}), flush=True)


def spawn(opts: argparse.Namespace, argv: list[str], path: str, precision: str) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child",
               json.dumps({"path": path, "precision": precision})]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MASTER_PORT", None)  # each child picks a free port
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {path} {precision}: FAILED (exit {proc.returncode})\n{tail}", file=sys.stderr, flush=True)
        return {"path": path, "precision": precision, "error": tail}
    return json.loads(lines[-1][len("RESULT "):])


def summarise(opts: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return result
    vocab = opts.vocab_size
    if result["path"] != "hf":  # the project pads the vocabulary and computes with the padded size
        from megatron.mpu import pad_vocab_size

        vocab = pad_vocab_size(opts.vocab_size, 128, 1)
    flops = model_flops_per_token(opts.num_layers, opts.hidden_size, opts.seq_length, vocab)
    step_s = statistics.median(result["step_s"])
    tokens_per_s = opts.batch_size * opts.seq_length / step_s
    tflops = tokens_per_s * flops / 1e12
    return dict(result, step_s_median=step_s, step_s_min=min(result["step_s"]), tokens_per_s=tokens_per_s,
                tflops=tflops, mfu=tflops / result["peak_tflops"], flops_per_token=flops)


def pool(opts: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one (path, precision): all timed steps, the best peak."""
    good = [result for result in results if "error" not in result]
    if not good:
        return results[0]
    pooled = dict(good[0], step_s=[t for result in good for t in result["step_s"]],
                  peak_tflops=max(result["peak_tflops"] for result in good))
    return summarise(opts, pooled)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | precision | step s (median) | step s (min) | tokens/s | TFLOP/s | peak TFLOP/s "
             "| MFU | vs HF |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['path']} | {row['precision']} | failed | | | | | | |")
            continue
        ratio = row.get("vs_hf")
        lines.append(f"| {row['path']} | {row['precision']} | {row['step_s_median']:.3f} | {row['step_s_min']:.3f} "
                     f"| {row['tokens_per_s']:.0f} | {row['tflops']:.3f} | {row['peak_tflops']:.3f} "
                     f"| {row['mfu']:.1%} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.child:
        run_child(opts)
        return
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_index in range(opts.rounds):
        for precision in opts.precisions:
            for path in opts.paths:
                print(f"  round {round_index + 1}/{opts.rounds}: {path} {precision} ...", file=sys.stderr, flush=True)
                runs.setdefault((path, precision), []).append(summarise(opts, spawn(opts, argv, path, precision)))
    rows = [pool(opts, results) for results in runs.values()]
    for row in rows:
        hf_runs = runs.get(("hf", row["precision"]), [])
        ratios = [ours["tokens_per_s"] / hf["tokens_per_s"] for ours, hf in zip(runs[(row["path"], row["precision"])], hf_runs)
                  if "error" not in ours and "error" not in hf]
        if ratios:
            row["vs_hf"], row["vs_hf_per_round"] = statistics.median(ratios), ratios
    print(markdown_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    with open(opts.output, "w") as handle:
        json.dump({"config": {k: v for k, v in vars(opts).items() if k != "child"},
                   "machine": {"device": str(device()), "threads": torch.get_num_threads(),
                               "load_average": os.getloadavg(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                   "rows": rows}, handle, indent=2)
    print(f"wrote {opts.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
