"""Process start-up shared by training and inference: what the launcher says (rank, world size,
rendezvous), joining the process group, the model-parallel groups and the seeds.

``read_launch_env`` is pure (it reads the environment); ``initialize_megatron`` is the one place
that starts ``torch.distributed``, after the whole configuration has been built and checked.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
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
    restart_count: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    max_restarts: int = 0  # torchrun's --max-restarts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a single-process run or a test's launcher)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SLURM_RANGES = r"\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\]"
_SLURM_HOST = rf"[\w.-]+(?:[\w.-]|{_SLURM_RANGES})*"
_SLURM_LIST = re.compile(rf"{_SLURM_HOST}(?:,{_SLURM_HOST})*")


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[003-005,007],cpu1`` -> ``gpu003``): from
    ``scontrol`` where SLURM is installed, else by reading the list's syntax ("" when it is not a
    node list)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    if not _SLURM_LIST.fullmatch(nodelist):
        return ""
    first = re.match(_SLURM_HOST, nodelist).group(0)
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _slurm_master(env: Mapping[str, str]) -> str:
    """The first host of SLURM's node list (127.0.0.1 without one); a list naming no host is a
    ConfigError."""
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            host = _first_slurm_host(env[name])
            if not host:
                raise ConfigError(f"{name}={env[name]!r} names no host to rendezvous at; fix it, or set MASTER_ADDR "
                                  "to the first node's host name")
            return host
    return "127.0.0.1"


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


MAX_RANKS = 2**31 - 1  # torch's stores and process groups count ranks in 32-bit integers


def _checked(launch: LaunchEnv, names: tuple[str, str, str]) -> LaunchEnv:
    """``launch`` if its values can form a process group, else a ConfigError naming the variable
    (``names``: the launcher's rank, world-size and local-rank variables)."""
    rank, size, local = names
    for name, value in ((rank, launch.rank), (size, launch.world_size), (local, launch.local_rank)):
        if abs(value) > MAX_RANKS:
            raise ConfigError(f"{name}={value} is out of range (at most {MAX_RANKS}); fix the launcher's variables "
                              "or unset them")
    if launch.world_size < 1:
        raise ConfigError(f"{size}={launch.world_size} must be at least 1; fix the launcher's variables or unset them")
    if not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"{rank}={launch.rank} must be in [0, {launch.world_size - 1}] for {size}="
                          f"{launch.world_size}; fix the launcher's variables or unset them")
    if launch.local_rank < 0:
        raise ConfigError(f"{local}={launch.local_rank} must be >= 0; fix the launcher's variables or unset them")
    if not launch.master_addr.strip():
        raise ConfigError("MASTER_ADDR is set but empty; set it to the rank-0 host (e.g. 127.0.0.1) or unset it")
    port = launch.master_port
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"MASTER_PORT={launch.master_port!r} is not a TCP port (0-65535); fix or unset it")
    return launch


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address set by the launcher.

    Understands torchrun and the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK), OpenMPI
    (OMPI_COMM_WORLD_*) and SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the first host of
    SLURM_JOB_NODELIST or SLURM_NODELIST is the master unless MASTER_ADDR is set); with none of
    them it is a single process. Values that cannot form a process group are a ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    port = env.get("MASTER_PORT", "6000")
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(LaunchEnv(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), _env_int(env, "LOCAL_RANK", 0),
                                  env.get("MASTER_ADDR", "127.0.0.1"), port,
                                  _env_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
                                  _env_int(env, "TORCHELASTIC_MAX_RESTARTS", 0)), ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return _checked(LaunchEnv(_env_int(env, "OMPI_COMM_WORLD_RANK"), _env_int(env, "OMPI_COMM_WORLD_SIZE"),
                                  _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), env.get("MASTER_ADDR", "127.0.0.1"),
                                  port), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _slurm_master(env)
        return _checked(LaunchEnv(_env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS"),
                                  _env_int(env, "SLURM_LOCALID", 0), addr, port), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    return _checked(LaunchEnv(0, 1, 0, "127.0.0.1", env.get("MASTER_PORT") or str(free_port())), ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def shared_rendezvous_store_note(environ: Mapping[str, str] | None = None) -> str | None:
    """A note for a run under torchrun's c10d rendezvous with its shared store, in which a node
    that joins the running job hangs it (torch 2.13: the new round's master address is never
    published to the joining node); None otherwise."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("TORCHELASTIC_RUN_ID", "none") in ("", "none"):
        return None  # not torchrun, a store per round, or the static (fixed master) rendezvous
    return (" note: torchrun's c10d rendezvous shares one store across rounds here, and a node that joins this job "
            "would hang it; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the launch scripts do) for an elastic "
            "run that may grow")


def check_master_addr(addr: str) -> None:
    """ConfigError unless ``MASTER_ADDR`` resolves (torch's rendezvous otherwise retries until
    the collective timeout, 10 minutes by default)."""
    try:
        socket.getaddrinfo(addr, None)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise ConfigError(f"MASTER_ADDR={addr!r} cannot be resolved ({reason}); set it to the rank-0 host's name or "
                          "address (127.0.0.1 on one machine)") from None


def _round_prefix(parallel: ParallelConfig, environ: Mapping[str, str] | None = None) -> str:
    """The store prefix of this group's keys. Under torchrun's agent store (a fixed master, or
    the c10d rendezvous sharing its store) every attempt of a job meets in the same store, so the
    keys of an attempt (the peers' addresses) must be its own, or a new attempt reads a dead
    rank's: they are named by the restart count, which the agents of such a job count alike, and
    the size. Otherwise (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, other launchers) each attempt has a
    fresh store, and the restart count must not be used: a node that joined later has counted
    fewer restarts than the others."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "megatron"
    return f"megatron/attempt_{parallel.restart_count}/world_{parallel.world_size}"


def initialize_distributed(parallel: ParallelConfig) -> None:
    """Join the process group of all ranks and select this rank's device."""
    if parallel.distributed_backend == "nccl":
        torch.cuda.set_device(parallel.device)
    if dist.is_initialized():
        return
    check_master_addr(parallel.master_addr)
    # DeepSpeed and torch read these whatever the launcher was.
    os.environ.update(MASTER_ADDR=parallel.master_addr, MASTER_PORT=parallel.master_port,
                      RANK=str(parallel.rank), WORLD_SIZE=str(parallel.world_size),
                      LOCAL_RANK=str(parallel.local_rank))
    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    try:
        store, _, _ = next(dist.rendezvous(f"tcp://{parallel.master_addr}:{parallel.master_port}", parallel.rank,
                                           parallel.world_size, timeout=timeout))
        store = dist.PrefixStore(_round_prefix(parallel), store)
        dist.init_process_group(backend=parallel.distributed_backend, store=store, rank=parallel.rank,
                                world_size=parallel.world_size, timeout=timeout)
    except dist.DistNetworkError as error:
        if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
            raise ConfigError(f"MASTER_PORT {parallel.master_port} on {parallel.master_addr} is already in use by "
                              "another process (another job?): pick a free port, or unset MASTER_PORT for a "
                              "single process") from None
        raise


def restart_counts(parallel: ParallelConfig) -> tuple[int, int]:
    """The fewest and the most restarts the ranks' torchrun agents have counted (collective). They
    differ when a node joined after a failure: its agent is new and has counted none."""
    if not dist.is_initialized() or parallel.world_size == 1:
        return parallel.restart_count, parallel.restart_count
    device = "cuda" if parallel.distributed_backend == "nccl" else "cpu"
    fewest = torch.tensor([parallel.restart_count], dtype=torch.int64, device=device)
    most = fewest.clone()
    dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(fewest.item()), int(most.item())


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then the model-parallel tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mpu.model_parallel_cuda_manual_seed(seed)


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (from /proc), None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class LauncherWatch:
    """The launcher a worker must not outlive: its parent (torchrun's agent, or the deepspeed
    launcher's per-node ``launch.py``) and, under the deepspeed launcher, the parent's parent (the
    ``deepspeed`` command itself, which does not stop ``launch.py`` when it is killed). Either
    being re-parented means the launcher is gone."""

    parent: int
    grandparent: int | None

    def alive(self) -> bool:
        if os.getppid() != self.parent:
            return False
        return self.grandparent is None or _parent_of(self.parent) == self.grandparent


_LAUNCHER: LauncherWatch | None = None


def find_launcher(environ: Mapping[str, str] | None = None) -> LauncherWatch | None:
    """The launcher that started this process, if it is torchrun or the deepspeed launcher."""
    env = os.environ if environ is None else environ
    parent = os.getppid()
    command = _command_of(parent)
    if "deepspeed.launcher.launch" in command:
        return LauncherWatch(parent, _parent_of(parent))
    if "TORCHELASTIC_RUN_ID" in env or "torch.distributed.run" in command or "torchrun" in command:
        return LauncherWatch(parent, None)
    return None


def exit_orphaned(watch: LauncherWatch) -> None:
    """Leave at once: nothing of this worker may outlive its launcher (no checkpoint is started)."""
    rank = os.environ.get("RANK", "0")
    print(f"error (rank {rank}): the launcher (pid {watch.parent}) is gone; exiting without writing another "
          "checkpoint", file=sys.stderr, flush=True)
    os._exit(1)


def watch_launcher(interval_s: float = 0.5) -> None:
    """Under a launcher, exit this worker within ``interval_s`` of the launcher's death (a killed
    torchrun or deepspeed launcher otherwise leaves its workers training and saving)."""
    global _LAUNCHER
    _LAUNCHER = find_launcher()
    if _LAUNCHER is None:
        return

    def watch(launcher: LauncherWatch) -> None:
        while launcher.alive():
            time.sleep(interval_s)
        exit_orphaned(launcher)

    threading.Thread(target=watch, args=(_LAUNCHER,), name="launcher-watch", daemon=True).start()


def ensure_launcher_alive() -> None:
    """Exit at once if this worker's launcher died (called before starting a checkpoint)."""
    if _LAUNCHER is not None and not _LAUNCHER.alive():
        exit_orphaned(_LAUNCHER)


def initialize_megatron(parallel: ParallelConfig, seed: int) -> None:
    """Distributed start-up, model-parallel groups and seeds; every rank calls it. Under a
    launcher, a watchdog ends this process if the launcher dies."""
    watch_launcher()
    initialize_distributed(parallel)
    mpu.initialize_model_parallel(parallel.model_parallel_size, parallel.pipe_parallel_size)
    set_random_seed(seed)
