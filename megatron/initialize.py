"""Process start-up: rank and world size from any launcher, torch.distributed, groups and seeds."""

from __future__ import annotations

import argparse
import datetime
import os
import random
import socket
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address set by the launcher.

    Understands torchrun and the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK), OpenMPI
    (OMPI_COMM_WORLD_*) and SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); with none of them
    it is a single process.
    """
    env = os.environ if environ is None else environ
    port = env.get("MASTER_PORT", "6000")
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port)
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"), port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port)
    return LaunchEnv(0, 1, 0, "127.0.0.1", env.get("MASTER_PORT") or str(_free_port()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_distributed(args: argparse.Namespace) -> None:
    """Join the process group of all ranks and set this rank's device."""
    launch = read_launch_env()
    args.rank, args.world_size, args.local_rank = launch.rank, launch.world_size, launch.local_rank
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.distributed_backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("--distributed-backend nccl needs CUDA GPUs; use gloo on CPU")
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    args.device = torch.device("cuda", torch.cuda.current_device()) if args.distributed_backend == "nccl" \
        else torch.device("cpu")
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", launch.master_port)
    # DeepSpeed and torch read these whatever the launcher was.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    dist.init_process_group(
        backend=args.distributed_backend,
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
    )


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then the model-parallel tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mpu.model_parallel_cuda_manual_seed(seed)


def initialize_megatron(args: argparse.Namespace) -> None:
    """Distributed start-up, model-parallel groups and seeds; every rank calls it."""
    initialize_distributed(args)
    per_replica = args.model_parallel_size * args.pipe_parallel_size
    if args.world_size % per_replica:
        pipe = f" x --pipe-parallel-size ({args.pipe_parallel_size})" if args.pipe_parallel_size > 1 else ""
        raise ConfigError(f"world size ({args.world_size}) is not divisible by --model-parallel-size "
                          f"({args.model_parallel_size}){pipe}; launch a multiple of {per_replica} processes")
    mpu.initialize_model_parallel(args.model_parallel_size, args.pipe_parallel_size)
    args.data_parallel_size = mpu.get_data_parallel_world_size()
    set_random_seed(args.seed)
