"""Process start-up shared by training and inference: what the launcher says (rank, world size,
rendezvous), joining the process group, the model-parallel groups and the seeds.

``read_launch_env`` is pure (it reads the environment); ``initialize_megatron`` is the one place
that starts ``torch.distributed``, after the whole configuration has been built and checked.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.errors import ConfigError

if TYPE_CHECKING:
    from megatron.config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    """Rank, world size, local rank and rendezvous address, as set by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: str


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a single-process run or a test's launcher)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    """The launcher variable ``name`` as an integer; a value that is not one is a user error."""
    value = env.get(name)
    if value is None:
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set; the launcher (mpirun, srun) sets it with the others")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; it is set by the launcher "
                          "(torchrun, deepspeed, mpirun, srun): fix or unset it") from None


def _checked(launch: LaunchEnv, source: str) -> LaunchEnv:
    """``launch`` if its values can form a process group, else a ConfigError naming them."""
    if launch.world_size < 1:
        raise ConfigError(f"world size {launch.world_size} ({source}) must be at least 1")
    if not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"rank {launch.rank} ({source}) must be in [0, {launch.world_size - 1}] "
                          f"for a world size of {launch.world_size}")
    if launch.local_rank < 0:
        raise ConfigError(f"local rank {launch.local_rank} ({source}) must be >= 0")
    port = launch.master_port
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"MASTER_PORT={launch.master_port!r} is not a TCP port (0-65535); fix or unset it")
    return launch


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address set by the launcher.

    Understands torchrun and the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK), OpenMPI
    (OMPI_COMM_WORLD_*) and SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); with none of them
    it is a single process. Values that cannot form a process group are a ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    port = env.get("MASTER_PORT", "6000")
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(LaunchEnv(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), _env_int(env, "LOCAL_RANK", 0),
                                  env.get("MASTER_ADDR", "127.0.0.1"), port), "RANK, WORLD_SIZE, LOCAL_RANK")
    if "OMPI_COMM_WORLD_RANK" in env:
        return _checked(LaunchEnv(_env_int(env, "OMPI_COMM_WORLD_RANK"), _env_int(env, "OMPI_COMM_WORLD_SIZE"),
                                  _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), env.get("MASTER_ADDR", "127.0.0.1"),
                                  port), "OMPI_COMM_WORLD_*")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return _checked(LaunchEnv(_env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"),
                                  _env_int(env, "SLURM_LOCALID", 0), addr, port), "SLURM_PROCID, SLURM_NTASKS")
    return _checked(LaunchEnv(0, 1, 0, "127.0.0.1", env.get("MASTER_PORT") or str(free_port())), "single process")


def initialize_distributed(parallel: ParallelConfig) -> None:
    """Join the process group of all ranks and select this rank's device."""
    if parallel.distributed_backend == "nccl":
        torch.cuda.set_device(parallel.device)
    if dist.is_initialized():
        return
    # DeepSpeed and torch read these whatever the launcher was.
    os.environ.update(MASTER_ADDR=parallel.master_addr, MASTER_PORT=parallel.master_port,
                      RANK=str(parallel.rank), WORLD_SIZE=str(parallel.world_size),
                      LOCAL_RANK=str(parallel.local_rank))
    dist.init_process_group(
        backend=parallel.distributed_backend,
        init_method=f"tcp://{parallel.master_addr}:{parallel.master_port}",
        rank=parallel.rank,
        world_size=parallel.world_size,
        timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
    )


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then the model-parallel tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mpu.model_parallel_cuda_manual_seed(seed)


def initialize_megatron(parallel: ParallelConfig, seed: int) -> None:
    """Distributed start-up, model-parallel groups and seeds; every rank calls it."""
    initialize_distributed(parallel)
    mpu.initialize_model_parallel(parallel.model_parallel_size, parallel.pipe_parallel_size)
    set_random_seed(seed)
