"""Peak memory of resuming a checkpoint at another topology (issue 17), for the GPT-2 124M shape.

    python tools/bench_reshard_memory.py                # 124M, Megatron MP 2 checkpoint -> MP 1 and MP 2 readers
    python tools/bench_reshard_memory.py --layers 2 --hidden 128    # a quick small run

A resume at another tensor- or pipeline-parallel size, or on the other path, goes through the
universal copy (``megatron/checkpoint/reshard.py``): rank 0 reads the checkpoint and writes one
folder per parameter; then every rank reads its slices, one whole parameter at a time. This
measures, each step in a fresh process (peak resident set size, ``ru_maxrss``, above the
process's size before the step):

1. ``make``: a real Megatron-path checkpoint at model parallel 2 (fp32 weights and Adam moments
   of the 124M shape, vocabulary 50257 padded to 50304), written by the project's own writer;
2. ``convert``: what rank 0 does (``read_checkpoint_directory`` + ``write_universal``);
3. ``load`` at model parallel 1 and 2 (gloo ranks): each rank builds its model slice, then reads
   its slices of the weights and both Adam moments (what ``MegatronBackend._load_universal``
   does). Reported: the rank's own state (what it keeps) and the peak above it (the transient).

Prints a Markdown table and writes ``bench_out/bench_reshard_memory.json``. Never fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dir", default=None, help="scratch directory (default: the system temp dir)")
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_reshard_memory.json"))
    parser.add_argument("--step", choices=["make", "convert", "load"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("layers", "hidden", "heads", "vocab"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.hidden % args.heads or args.heads % 2:
        parser.error(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}), an even number")
    return args


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def current_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _init(world: int, rank: int, model_parallel: int) -> None:
    import torch.distributed as dist

    from megatron import mpu

    if not dist.is_initialized():
        dist.init_process_group("gloo", world_size=world, rank=rank)
    mpu.initialize_model_parallel(model_parallel)


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from megatron.model import GPT2Model
    from megatron.mpu import pad_vocab_size

    padded = pad_vocab_size(args.vocab, 128, 1)
    return GPT2Model(num_layers=args.layers, vocab_size=padded, hidden_size=args.hidden,
                     num_attention_heads=args.heads, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                     output_dropout_prob=0.0, max_sequence_length=1024, checkpoint_activations=False)


def make(args: argparse.Namespace) -> dict:
    """A Megatron-path checkpoint at model parallel 2 with Adam state, by the project's writer."""
    from megatron.checkpoint.convert import (
        Checkpoint,
        optimizer_param_names,
        write_megatron_checkpoint,
    )

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _init(1, 0, 1)
    serial = {name: tensor.detach().clone() for name, tensor in _model(args).state_dict().items()}
    state = {name: {"exp_avg": torch.randn_like(t) * 1e-3, "exp_avg_sq": torch.rand_like(t) * 1e-6,
                    "step": torch.tensor(100.0)} for name, t in serial.items()}
    decay = [n for n in optimizer_param_names(list(serial)) if not n.endswith(".bias") and "layernorm" not in n]
    indices = [list(range(len(decay))), list(range(len(decay), len(serial)))]
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": w, "params": i}
              for w, i in zip((0.01, 0.0), indices)]
    config = {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
              "max_position_embeddings": 1024, "padded_vocab_size": serial["word_embeddings.weight"].size(0),
              "model_parallel_size": 2, "pipe_parallel_size": 1, "vocab_size": args.vocab}
    schedule = {"start_lr": 1e-4, "warmup_iter": 10, "num_iters": 100, "decay_style": "cosine", "end_iter": 1000,
                "min_lr": 0.0}
    checkpoint = Checkpoint(model=serial, model_config=config, iteration=100, consumed_samples=800, kind="megatron",
                            optimizer={"param_state": state, "masters": None, "param_groups": groups, "wrapper": None},
                            lr_scheduler=schedule)
    write_megatron_checkpoint(checkpoint, os.path.join(args.work, "source"), 2)
    params = sum(t.numel() for t in serial.values())
    return {"parameters": params, "state_mb": params * 12 / MB}


def convert(args: argparse.Namespace) -> dict:
    """Rank 0's step: read the checkpoint whole, write the universal copy."""
    from megatron.checkpoint.convert import read_checkpoint_directory
    from megatron.checkpoint.layout import Topology
    from megatron.checkpoint.universal import write_universal

    before = current_mb()
    checkpoint = read_checkpoint_directory(os.path.join(args.work, "source", "iter_0000100"), deepspeed_optimizer=True)
    target = Topology("megatron", 0, 1, 1, 1)
    write_universal(checkpoint, os.path.join(args.work, "copy"), target, {"model_parallel_size": 1}, 1234)
    return {"before_mb": before, "peak_above_mb": peak_mb() - before}


def load(args: argparse.Namespace) -> dict:
    """One rank of ``torchrun``: its model slice, then its slices of weights and Adam moments."""
    from megatron import mpu
    from megatron.checkpoint.universal import MOMENTS, read_slice

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    _init(world, rank, world)
    model = _model(args)
    before = current_mb()
    kept = {}
    for name, param in model.named_parameters():
        for key in ("fp32", *MOMENTS):
            kept[(name, key)] = read_slice(os.path.join(args.work, "copy"), name, key, param.shape)
    own = sum(t.numel() for t in kept.values()) * 4 / MB
    result = {"model_parallel": world, "rank": mpu.get_model_parallel_rank(), "own_state_mb": own,
              "model_mb": sum(p.numel() for p in model.parameters()) * 4 / MB,
              "peak_above_model_mb": peak_mb() - before}
    with open(os.path.join(args.work, f"load_{world}_{rank}.json"), "w") as handle:  # ranks share stdout
        json.dump(result, handle)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(args: argparse.Namespace, step: str, work: str, ranks: int | None = None) -> list[dict]:
    flags = [f"--layers={args.layers}", f"--hidden={args.hidden}", f"--heads={args.heads}", f"--vocab={args.vocab}",
             f"--step={step}", f"--work={work}"]
    if ranks is None:
        command = [sys.executable, os.path.abspath(__file__), *flags]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   str(_free_port()), os.path.abspath(__file__), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"step {step} failed:\n{result.stderr[-3000:]}")
    out = result.stdout
    if ranks is not None:
        return [json.load(open(os.path.join(work, f"load_{ranks}_{rank}.json"))) for rank in range(ranks)]
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step is not None:
        result = {"make": make, "convert": convert, "load": load}[args.step](args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        made = _child(args, "make", work)[0]
        converted = _child(args, "convert", work)[0]
        loads = _child(args, "load", work, 1) + _child(args, "load", work, 2)
    rows = [("rank 0: read the checkpoint, write the copy", "-", f"{converted['peak_above_mb']:.0f}")]
    rows += [(f"model parallel {r['model_parallel']}, rank {r['rank']}: read its slices",
              f"{r['own_state_mb']:.0f}", f"{r['peak_above_model_mb']:.0f}") for r in sorted(
                  loads, key=lambda r: (r["model_parallel"], r["rank"]))]
    print(f"GPT-2 shape: {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}: "
          f"{made['parameters'] / 1e6:.1f}M parameters, weights + Adam moments {made['state_mb']:.0f} MiB\n")
    print("| step | the rank's own state (MiB) | peak RSS above the process before it (MiB) |\n|---|---:|---:|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"shape": vars(args) | {"step": None, "work": None}, "checkpoint": made, "convert": converted,
                   "load": loads}, handle, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
