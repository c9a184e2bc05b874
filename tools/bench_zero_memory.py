"""Per-rank memory of model states under ZeRO, measured from the tensors each rank holds.

    python tools/bench_zero_memory.py --ranks 2 4 --stages 0 1 2 3

launches, for each rank count and ZeRO stage, a fresh ``torchrun`` job (CPU ranks here, GPUs
elsewhere) that builds GPT-2 through the real DeepSpeed seam (bf16 on CPU, --precision fp16 on
GPUs), runs two optimizer steps and a third backward, and then, with gradients present and before
the step, sums the bytes of every distinct tensor storage alive on the rank (parameters,
gradients, master weights, optimizer moments, DeepSpeed's flat buffers; the input batch is
excluded). The maximum over ranks is compared with the ZeRO paper's accounting for
mixed-precision Adam: 16 bytes/parameter (stage 0), 4 + 12/N (1), 2 + 14/N (2), 16/N (3), N
being the data-parallel size. It prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron import mpu  # noqa: E402
from megatron.launch import free_port  # noqa: E402

PAPER_BYTES = {0: lambda n: 16.0, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n}


def live_tensor_bytes(exclude: list[torch.Tensor]) -> dict[str, int]:
    """Bytes of distinct storages of all live tensors (and parameters) on this process, by the
    dtype of a tensor viewing each storage."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    dtypes: dict[int, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
        ptr = storage.data_ptr()
        if ptr and ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
            dtypes.setdefault(ptr, str(obj.dtype).replace("torch.", ""))
    by_dtype: dict[str, int] = {}
    for ptr, nbytes in seen.items():
        by_dtype[dtypes[ptr]] = by_dtype.get(dtypes[ptr], 0) + nbytes
    return by_dtype


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="data-parallel sizes to measure")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--output", default="bench_out/zero_memory.json")
    return parser.parse_args()


def run_config(bench: argparse.Namespace, stage: int, config_dir: str) -> Any:
    """The ``RunConfig`` of the measured run: GPT-2 through the DeepSpeed seam at ZeRO ``stage``."""
    from arguments import build_parser, build_run_config

    config = os.path.join(config_dir, "ds_config.json")
    with open(config, "w") as handle:
        json.dump({"zero_optimization": {
            "stage": stage, "reduce_bucket_size": 100_000, "allgather_bucket_size": 100_000,
            "stage3_prefetch_bucket_size": 100_000, "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 100_000, "stage3_max_reuse_distance": 100_000}}, handle)
    argv = ["--num-layers", str(bench.num_layers), "--hidden-size", str(bench.hidden_size),
            "--num-attention-heads", "8", "--seq-length", str(bench.seq_length),
            "--max-position-embeddings", str(bench.seq_length), "--batch-size", "1",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-decay-iters", "10",
            "--make-vocab-size-divisible-by", "1", "--deepspeed", "--deepspeed_config", config,
            f"--{bench.precision}"]
    return build_run_config(build_parser().parse_args(argv), vocab_size=bench.vocab_size,
                            eod_token=bench.vocab_size - 1)


def forward_step(data_iterator: Any, model: torch.nn.Module, run: Any) -> torch.Tensor:
    tokens = next(data_iterator)
    logits = model(tokens[:, :-1], None, None)
    return mpu.vocab_parallel_cross_entropy(logits.float(), tokens[:, 1:]).mean()


def measure(bench: argparse.Namespace, stage: int) -> dict[str, float]:
    from megatron.backends.deepspeed import DeepSpeedBackend
    from megatron.model import GPT2Model

    with tempfile.TemporaryDirectory() as config_dir:
        run = run_config(bench, stage, config_dir)
    model_config = run.model
    torch.manual_seed(0)
    model = GPT2Model(model_config.num_layers, bench.vocab_size, model_config.hidden_size,
                      model_config.num_attention_heads, 0.0, 0.0, 0.0, bench.seq_length, False).to(run.device)
    num_params = sum(p.numel() for p in model.parameters())
    backend = DeepSpeedBackend(model, run, forward_step)
    del model
    tokens = torch.randint(0, bench.vocab_size, (1, bench.seq_length + 1), device=run.device)
    batches = itertools.repeat(tokens)
    for _ in range(2):
        backend.train_step(batches)
    loss = forward_step(batches, backend.model, run)
    backend.model.backward(loss)
    del loss
    gc.collect()
    held = live_tensor_bytes([tokens])
    backend.model.step()
    names = sorted(held)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, held)
    busiest = max(gathered, key=lambda rank: sum(rank.values()))  # the rank holding the most
    total = sum(busiest.values())
    n = dist.get_world_size()
    expected = PAPER_BYTES[stage](n) * num_params
    return {"stage": stage, "ranks": n, "parameters": num_params, "bytes_per_rank": float(total),
            "bytes_per_param": total / num_params, "paper_bytes_per_param": PAPER_BYTES[stage](n),
            "ratio_to_paper": total / expected,
            "bytes_per_param_by_dtype": {name: busiest.get(name, 0) / num_params for name in names}}


def run_worker(bench: argparse.Namespace) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(0)
    row = measure(bench, bench.stages[0])
    if dist.get_rank() == 0:
        with open(bench.output, "w") as handle:
            json.dump(row, handle)
    dist.destroy_process_group()


def launch(bench: argparse.Namespace, ranks: int, stage: int, out_file: str) -> dict:
    import subprocess

    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(port), os.path.abspath(__file__), "--worker", "--stages", str(stage),
               "--num-layers", str(bench.num_layers), "--hidden-size", str(bench.hidden_size),
               "--vocab-size", str(bench.vocab_size), "--seq-length", str(bench.seq_length),
               "--precision", bench.precision, "--output", out_file]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} with {ranks} ranks failed:\n{result.stderr[-3000:]}")
    with open(out_file) as handle:
        return json.load(handle)


def main() -> None:
    bench = parse_args()
    if bench.worker:
        run_worker(bench)
        return
    os.makedirs(os.path.dirname(bench.output) or ".", exist_ok=True)
    rows = [launch(bench, ranks, stage, bench.output + f".{ranks}.{stage}.tmp")
            for ranks in bench.ranks for stage in bench.stages]
    print(f"\nZeRO model-state memory per rank ({bench.precision}, {rows[0]['parameters'] / 1e6:.2f}M parameters, "
          "measured with gradients present, before the optimizer step)")
    print("| ranks | stage | MB per rank | bytes/param | paper bytes/param | ratio | bytes/param by dtype |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        split = ", ".join(f"{name} {value:.2f}" for name, value in row["bytes_per_param_by_dtype"].items() if value)
        print(f"| {row['ranks']} | {row['stage']} | {row['bytes_per_rank'] / 2**20:.1f} | "
              f"{row['bytes_per_param']:.2f} | {row['paper_bytes_per_param']:.2f} | {row['ratio_to_paper']:.3f} | "
              f"{split} |")
    for ranks in bench.ranks:
        for stage in bench.stages:
            os.remove(bench.output + f".{ranks}.{stage}.tmp")
    with open(bench.output, "w") as handle:
        json.dump({"precision": bench.precision, "rows": rows}, handle, indent=2)
    print(f"wrote {bench.output}")


if __name__ == "__main__":
    main()
