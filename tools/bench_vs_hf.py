"""One training step of this project's GPT-2 against Hugging Face's ``GPT2LMHeadModel``, side by side.

    python tools/bench_vs_hf.py                      # 4 layers, hidden 256, seq 256, batch 8, vocab 50257
    python tools/bench_vs_hf.py --shape 124m         # GPT-2 124M: 12 x 768, 12 heads, seq 512, batch 4
    python tools/bench_vs_hf.py --precisions bf16 --paths megatron hf hf-compile --steps 8
    python tools/bench_vs_hf.py --rounds 1 --steps 1 --profile 12   # where one step's CPU time goes

Same GPT-2 configuration (dropout 0.1 everywhere), same random token batches (fixed seed), same
machine, one invocation. Each (path, precision) runs in a fresh child process, so one path's memory
(or allocator state) cannot speed up or slow down another; the paths run in turn, in reversed order
every other round. Paths:

* ``megatron``: ``MegatronBackend`` (fp32, or ``--bf16``/``--fp16``: half weights with fp32 master
  weights in ``FP16_Optimizer``);
* ``megatron-compile``: the same with ``--compile``;
* ``deepspeed-zero0``/``deepspeed-zero1``: ``DeepSpeedBackend`` with ZeRO 0/1 on one rank (half
  weights with DeepSpeed's fp32 masters);
* ``hf``: ``transformers.GPT2LMHeadModel`` as its users train it: SDPA attention,
  ``gelu_pytorch_tanh`` (one kernel, GPT-2's tanh GELU), fp32 weights under ``torch.autocast`` for
  bf16/fp16, ``torch.optim.AdamW`` fused where torch has it, clipping at 1.0 as the HF Trainer
  does (``clip_grad_norm_``), weight decay off for biases and LayerNorm as the Trainer's;
* ``hf-compile``: the same model under ``torch.compile`` (the Trainer's ``torch_compile``);
* ``hf-bf16-weights`` (bf16 only): the project's recipe on the HF model: bf16 weights, fp32 master
  copies updated by fused AdamW, gradients widened and weights narrowed with ``_foreach_copy_``
  (what ``FP16_Optimizer`` does; no loss scale, as bf16 needs none).

Compilation falls in the discarded warm-up steps (``--warmup-steps``, their time is reported in
the ``warm-up s`` column). All the project's paths are built as ``megatron/training/loop.py``
builds them (single-rank gloo group, ``pretrain_gpt2.model_provider``/``forward_step``). Reports
tokens/s (median over the timed steps of all rounds), model TFLOP/s
(``megatron.training.flops.model_flops_per_token``), MFU against a known GPU's data-sheet peak
(else a matmul peak measured on the spot for each precision), each path's ratio to HF eager and
HF compiled in the same precision (median of the rounds' ratios), and per precision the project's
best path against each HF path. ``--profile N`` adds, from round 1, the N ops taking the most CPU
time in one extra step of each path. ``--malloc-no-mmap`` runs every child, both sides alike, with
glibc's malloc never returning large blocks to the kernel (``GLIBC_TUNABLES``), to show how much of
a ratio is page faults rather than compute. Prints Markdown tables and writes
``bench_out/bench_vs_hf.json``. A benchmark: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
PATHS = ("megatron", "megatron-compile", "deepspeed-zero0", "deepspeed-zero1", "hf", "hf-compile",
         "hf-bf16-weights")
HF_BASELINES = {"hf": "HF eager", "hf-compile": "HF compiled"}
# Model shapes by name; any flag given on the command line overrides the preset.
SHAPES: dict[str, dict[str, int]] = {
    "default": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 256,
                "batch_size": 8},
    # GPT-2 small (124M parameters) at sequence 512. Batch 4 on a 2-core EPYC: steps of 6-15 s, peak RSS
    # under 7 GB per process (measured 2026-12-01 on both sides, fp32 and bf16).
    "124m": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "seq_length": 512,
             "batch_size": 4},
}
ProfileRow = tuple[str, float, int]  # op name, self CPU seconds, calls
# --malloc-no-mmap: glibc serves every block from its heaps and never trims them. By default blocks
# over 32 MiB (GPT-2's logits, a 124M model's attention scores) are mmapped and unmapped each time:
# their first touch costs a page fault per 4 KiB page (about 0.4 ms per MB on this CPU).
NO_MMAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default",
                        help="model shape preset; --num-layers etc. override its fields")
    for name in SHAPES["default"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps run and discarded first (they hold torch.compile's compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (the median is reported)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat the whole sweep, path order reversed every other round")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="default: fp32 bf16 (and fp16 when a GPU is present)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--malloc-no-mmap", action="store_true",
                        help="run every child, both sides alike, with glibc malloc never using mmap (no page "
                             "faults for large fresh tensors, as under jemalloc/tcmalloc)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile one extra step per path in round 1 and print its N costliest ops")
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_vs_hf.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON: one (path, precision)
    args = parser.parse_args(argv)
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    bad = [p for p in args.precisions if p not in ("fp32", "bf16", "fp16")]
    if bad:
        raise SystemExit(f"unknown precision(s) {bad}: choose from fp32 bf16 fp16")
    if "fp16" in args.precisions and not torch.cuda.is_available():
        raise SystemExit("fp16 needs a GPU (DeepSpeed and autocast fp16 matmuls); drop it on CPU")
    if args.rounds < 1 or args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit(f"--rounds ({args.rounds}) and --steps ({args.steps}) must be at least 1, "
                         f"--warmup-steps ({args.warmup_steps}) at least 0")
    return args


def applies(path: str, precision: str) -> bool:
    """``hf-bf16-weights`` is a bf16 recipe (fp16 weights would need loss scaling; fp32 is ``hf``)."""
    return path != "hf-bf16-weights" or precision == "bf16"


def recipe(path: str, precision: str) -> str:
    """How a path holds its weights in ``precision``."""
    if precision == "fp32":
        return "fp32 weights"
    if path in ("hf", "hf-compile"):
        return f"fp32 weights, autocast {precision}"
    return f"{precision} weights, fp32 masters"


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


def time_steps(step: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> list[float]:
    """Seconds of each step, one batch each."""
    times = []
    for batch in batches:
        synchronize()
        start = time.perf_counter()
        step(batch)
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def profile_step(step: Callable[[torch.Tensor], Any], batch: torch.Tensor, top: int) -> dict[str, Any]:
    """One step under ``torch.profiler``: the ``top`` ops by self CPU time, and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    events = [event for event in prof.key_averages() if event.self_cpu_time_total > 0]
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    rows: list[ProfileRow] = [(event.key, event.self_cpu_time_total / 1e6, event.count) for event in events[:top]]
    return {"self_cpu_s": sum(event.self_cpu_time_total for event in events) / 1e6, "ops": rows}


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


def megatron_step(opts: argparse.Namespace, precision: str, path: str) -> Callable[[torch.Tensor], None]:
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

    return step


def hf_model(opts: argparse.Namespace) -> torch.nn.Module:
    """``GPT2LMHeadModel`` of the benchmark's shape (fp32, train mode, dropout 0.1, seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(opts.seed)
    config = GPT2Config(vocab_size=opts.vocab_size, n_positions=opts.seq_length, n_embd=opts.hidden_size,
                        n_layer=opts.num_layers, n_head=opts.num_attention_heads,
                        activation_function="gelu_pytorch_tanh", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).to(device()).train()


def hf_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as the HF Trainer builds it (no decay on biases and LayerNorm: 1-d tensors), fused
    where this torch has a fused AdamW for the device."""
    from megatron.backends.base import fused_adamw_available

    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.01, fused=fused_adamw_available(device()))


def hf_step(opts: argparse.Namespace, precision: str, path: str) -> Callable[[torch.Tensor], None]:
    """``GPT2LMHeadModel`` + AdamW + clipping: fp32 weights (autocast for bf16/fp16), optionally
    compiled (``hf-compile``)."""
    model = hf_model(opts)
    optimizer = hf_adamw(list(model.parameters()))
    forward = torch.compile(model) if path == "hf-compile" else model
    scaler = torch.amp.GradScaler(device().type, enabled=precision == "fp16")
    autocast = torch.autocast(device().type, dtype=HALF.get(precision, torch.float32),
                              enabled=precision != "fp32")

    def step(batch: torch.Tensor) -> None:
        tokens = batch[:, :-1].to(device())
        with autocast:
            loss = forward(input_ids=tokens, labels=tokens).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_bf16_weights_step(opts: argparse.Namespace) -> Callable[[torch.Tensor], None]:
    """The project's bf16 recipe on ``GPT2LMHeadModel``: bf16 weights, fp32 masters stepped by
    AdamW, gradients widened into the masters' and weights narrowed back with ``_foreach_copy_``."""
    model = hf_model(opts).to(torch.bfloat16)
    params = list(model.parameters())
    masters = [torch.nn.Parameter(param.detach().float()) for param in params]
    for master in masters:
        master.grad = torch.zeros_like(master)
    optimizer = hf_adamw(masters)

    def step(batch: torch.Tensor) -> None:
        tokens = batch[:, :-1].to(device())
        model(input_ids=tokens, labels=tokens).loss.backward()
        with torch.no_grad():
            torch._foreach_copy_([master.grad for master in masters], [param.grad for param in params])
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
            optimizer.step()
            torch._foreach_copy_(params, masters)
        model.zero_grad(set_to_none=True)

    return step


def build_step(opts: argparse.Namespace, precision: str, path: str) -> Callable[[torch.Tensor], None]:
    if path == "hf-bf16-weights":
        return hf_bf16_weights_step(opts)
    if path.startswith("hf"):
        return hf_step(opts, precision, path)
    return megatron_step(opts, precision, path)


def run_child(opts: argparse.Namespace) -> None:
    spec = json.loads(opts.child)
    path, precision = spec["path"], spec["precision"]
    peak, source = peak_tflops(precision)
    step = build_step(opts, precision, path)
    batches = token_batches(opts, opts.warmup_steps + opts.steps + 1)
    times = time_steps(step, batches[:-1])
    result = {"path": path, "precision": precision, "warmup_s": times[:opts.warmup_steps],
              "step_s": times[opts.warmup_steps:], "peak_tflops": peak, "peak_source": source}
    if spec.get("profile"):
        result["profile"] = profile_step(step, batches[-1], spec["profile"])
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def spawn(argv: list[str], path: str, precision: str, profile: int, malloc_no_mmap: bool = False) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child",
               json.dumps({"path": path, "precision": precision, "profile": profile})]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MASTER_PORT", None)  # each child picks a free port
    if malloc_no_mmap:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), NO_MMAP_TUNABLES]))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {path} {precision}: FAILED (exit {proc.returncode})\n{tail}", file=sys.stderr, flush=True)
        return {"path": path, "precision": precision, "error": tail}
    return json.loads(lines[-1][len("RESULT "):])


def summarise(opts: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    result = dict(result, recipe=recipe(result["path"], result["precision"]))
    if "error" in result:
        return result
    vocab = opts.vocab_size
    if not result["path"].startswith("hf"):  # the project pads the vocabulary and computes with the padded size
        from megatron.mpu import pad_vocab_size

        vocab = pad_vocab_size(opts.vocab_size, 128, 1)
    flops = model_flops_per_token(opts.num_layers, opts.hidden_size, opts.seq_length, vocab)
    step_s = statistics.median(result["step_s"])
    tokens_per_s = opts.batch_size * opts.seq_length / step_s
    tflops = tokens_per_s * flops / 1e12
    return dict(result, step_s_median=step_s, step_s_min=min(result["step_s"]), tokens_per_s=tokens_per_s,
                tflops=tflops, mfu=tflops / result["peak_tflops"], flops_per_token=flops)


def pool(opts: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one (path, precision): all timed steps, the best peak, the
    warm-up of the first good round (later rounds compile again from torch's on-disk cache)."""
    good = [result for result in results if "error" not in result]
    if not good:
        return results[0]
    pooled = dict(good[0], step_s=[t for result in good for t in result["step_s"]],
                  peak_tflops=max(result["peak_tflops"] for result in good),
                  max_rss_mb=max(result["max_rss_mb"] for result in good))
    return summarise(opts, pooled)


def round_ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[float]:
    """tokens/s of ``ours`` over ``theirs``, round by round (rounds where both ran)."""
    return [mine["tokens_per_s"] / other["tokens_per_s"] for mine, other in zip(ours, theirs)
            if "error" not in mine and "error" not in other]


def add_ratios(rows: list[dict[str, Any]], runs: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """Each row's ratio to HF eager (``vs_hf``) and HF compiled (``vs_hf_compile``): median of rounds."""
    for row in rows:
        for baseline in HF_BASELINES:
            ratios = round_ratios(runs[(row["path"], row["precision"])], runs.get((baseline, row["precision"]), []))
            if ratios:
                key = "vs_" + baseline.replace("-", "_")
                row[key], row[key + "_per_round"] = statistics.median(ratios), ratios


def best_of_ours(rows: list[dict[str, Any]], runs: dict[tuple[str, str], list[dict[str, Any]]],
                 precisions: list[str]) -> list[dict[str, Any]]:
    """Per precision: the project's fastest path (pooled tokens/s) against every HF path that ran
    (median of the rounds' ratios)."""
    summary = []
    for precision in precisions:
        ours = [row for row in rows if row["precision"] == precision and not row["path"].startswith("hf")
                and "error" not in row]
        if not ours:
            continue
        best = max(ours, key=lambda row: row["tokens_per_s"])
        vs = {}
        for path in (path for path in PATHS if path.startswith("hf")):
            ratios = round_ratios(runs[(best["path"], precision)], runs.get((path, precision), []))
            if ratios:
                vs[path] = statistics.median(ratios)
        summary.append({"precision": precision, "path": best["path"], "recipe": best["recipe"], "vs": vs})
    return summary


def ratio_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| path | precision | recipe | warm-up s | step s (median) | step s (min) | tokens/s | TFLOP/s "
             "| peak TFLOP/s | MFU | peak RSS GB | vs HF eager | vs HF compiled |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['path']} | {row['precision']} | {row['recipe']} | failed |" + " |" * 9)
            continue
        lines.append(f"| {row['path']} | {row['precision']} | {row['recipe']} | {sum(row['warmup_s']):.1f} "
                     f"| {row['step_s_median']:.3f} | {row['step_s_min']:.3f} | {row['tokens_per_s']:.0f} "
                     f"| {row['tflops']:.3f} | {row['peak_tflops']:.3f} | {row['mfu']:.1%} "
                     f"| {row['max_rss_mb'] / 1024:.1f} | {ratio_cell(row.get('vs_hf'))} "
                     f"| {ratio_cell(row.get('vs_hf_compile'))} |")
    return "\n".join(lines)


def summary_table(summary: list[dict[str, Any]]) -> str:
    """The project's best path per precision against each HF path (pooled medians)."""
    lines = ["| precision | project's best path | its recipe | vs hf | vs hf-compile | vs hf-bf16-weights |",
             "|---|---|---|---:|---:|---:|"]
    for entry in summary:
        cells = " | ".join(ratio_cell(entry["vs"].get(path)) for path in ("hf", "hf-compile", "hf-bf16-weights"))
        lines.append(f"| {entry['precision']} | {entry['path']} | {entry['recipe']} | {cells} |")
    return "\n".join(lines)


def profile_table(row: dict[str, Any]) -> str:
    """A row's profiled step: op, self CPU seconds, share of the step's self CPU time, calls."""
    profile = row["profile"]
    lines = [f"{row['path']} {row['precision']}: {profile['self_cpu_s']:.3f} s self CPU in one step",
             "| op | self CPU s | share | calls |", "|---|---:|---:|---:|"]
    for name, seconds, calls in profile["ops"]:
        lines.append(f"| `{name}` | {seconds:.3f} | {seconds / profile['self_cpu_s']:.1%} | {calls} |")
    return "\n".join(lines)


def sweep(opts: argparse.Namespace, argv: list[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (path, precision) once a round, in fresh processes; path order reversed every other round."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_index in range(opts.rounds):
        order = opts.paths if round_index % 2 == 0 else list(reversed(opts.paths))
        for precision in opts.precisions:
            for path in (path for path in order if applies(path, precision)):
                print(f"  round {round_index + 1}/{opts.rounds}: {path} {precision} ...", file=sys.stderr, flush=True)
                result = spawn(argv, path, precision, opts.profile if round_index == 0 else 0, opts.malloc_no_mmap)
                runs.setdefault((path, precision), []).append(summarise(opts, result))
    return runs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.child:
        run_child(opts)
        return
    runs = sweep(opts, argv)
    order = {(path, precision): index for index, (precision, path) in
             enumerate((precision, path) for precision in opts.precisions for path in opts.paths)}
    rows = sorted((pool(opts, results) for results in runs.values()),
                  key=lambda row: order[(row["path"], row["precision"])])
    add_ratios(rows, runs)
    summary = best_of_ours(rows, runs, opts.precisions)
    if opts.malloc_no_mmap:
        print(f"every child ran with GLIBC_TUNABLES={NO_MMAP_TUNABLES} (no mmap, no trimming)\n")
    print(markdown_table(rows) + "\n\n" + summary_table(summary))
    for row in rows:
        if "profile" in row:
            print("\n" + profile_table(row))
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    with open(opts.output, "w") as handle:
        json.dump({"config": {k: v for k, v in vars(opts).items() if k != "child"},
                   "machine": {"device": str(device()), "threads": torch.get_num_threads(),
                               "load_average": os.getloadavg(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                   "rows": rows, "best_of_ours": summary}, handle, indent=2)
    print(f"wrote {opts.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
