"""Every multi-node launcher, with "nodes" on this machine over 127.0.0.1 (issue 18): two torchrun
agents (c10d rendezvous, and a fixed master), two ``deepspeed --no_ssh --node_rank i`` launchers,
DeepSpeed's default PDSH launch over ssh to this machine, and a SLURM-style start (one process per
"node" with the SLURM_* variables srun sets). Each prints the losses of the same job on one node
within 1e-4 (the same global batch, dropout 0). Also: a worker SIGKILLed between checkpoints is
restarted by torchrun and the job prints the uninterrupted losses. Real processes, real DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import (
    ENV,
    NO_DROPOUT,
    TINY_GPT2,
    assert_losses_close,
    free_port,
    kill_node,
    losses,
    run_training,
    start_node,
)

ITERS = 12
BASE = [*TINY_GPT2, *NO_DROPOUT, "--eval-iters", "0", "--train-iters", str(ITERS), "--batch-size", "2"]
LAYOUTS = {"dp2": [], "mp2": ["--model-parallel-size", "2"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]


@pytest.fixture(scope="module")
def zero1(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    config = tmp_path_factory.mktemp("config") / "zero1.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    return ["--deepspeed", "--deepspeed_config", str(config)]


def _path_args(path: str, zero1: list[str]) -> list[str]:
    return zero1 if path == "deepspeed" else []


_SINGLE_NODE: dict[tuple[str, ...], dict[int, str]] = {}


def single_node(args: list[str]) -> dict[int, str]:
    """The losses of ``args`` on one node with two ranks (once per test session)."""
    key = tuple(args)
    if key not in _SINGLE_NODE:
        _SINGLE_NODE[key] = losses(run_training(2, args).stdout)
        assert set(_SINGLE_NODE[key]) == set(range(1, ITERS + 1)), _SINGLE_NODE[key]
    return _SINGLE_NODE[key]


def run_nodes(launches: list[tuple[list[str], dict[str, str]]], args: list[str], tmp_path: Path) -> str:
    """Start one "node" per (launcher command, environment), each running ``pretrain_gpt2.py args``;
    wait for all to succeed; their logs, joined."""
    logs = [tmp_path / f"node{i}.log" for i in range(len(launches))]
    nodes = []
    try:
        for (launcher, env), log in zip(launches, logs):
            nodes.append(start_node(launcher, "pretrain_gpt2.py", args, log, env))
        for node, log in zip(nodes, logs):
            assert node.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for node in nodes:
            kill_node(node)
    return "\n".join(log.read_text() for log in logs)


@pytest.mark.parametrize("path,layout,rendezvous", [
    ("megatron", "mp2", "c10d"), ("megatron", "dp2", "fixed master"),
    ("deepspeed", "mp2", "fixed master"), ("deepspeed", "dp2", "c10d")])
def test_two_torchrun_nodes_equal_one(path: str, layout: str, rendezvous: str, zero1: list[str], demo_corpus: Path,
                                      tmp_path: Path) -> None:
    args = [*BASE, *LAYOUTS[layout], *_path_args(path, zero1)]
    port = free_port()
    if rendezvous == "c10d":
        nodes = [["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  "--rdzv-id", f"two{port}"]] * 2
    else:
        nodes = [["--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
                 for rank in (0, 1)]
    log = run_nodes([([*TORCHRUN, *node], ENV) for node in nodes], args, tmp_path)
    assert "training with 2 ranks" in log
    assert_losses_close(losses(log), single_node(args))


def test_two_deepspeed_nodes_without_ssh_equal_one(zero1: list[str], demo_corpus: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    args = [*BASE, *zero1]
    log = run_nodes([([*DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                       "--master_addr", "127.0.0.1", "--master_port", port], ENV) for rank in (0, 1)], args, tmp_path)
    assert "training with 2 ranks" in log and "backend deepspeed" in log
    assert_losses_close(losses(log), single_node(args))


@pytest.mark.parametrize("path", ["megatron", "deepspeed"])
def test_a_slurm_style_start_equals_one_node(path: str, zero1: list[str], demo_corpus: Path, tmp_path: Path) -> None:
    """What ``srun --nodes 2 --ntasks-per-node 1 python pretrain_gpt2.py ...`` starts: one process
    per node, the rank from SLURM_PROCID, the master from the node list."""
    args = [*BASE, *_path_args(path, zero1)]
    slurm = {"SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "127.0.0.1,localhost",
             "MASTER_PORT": str(free_port())}
    log = run_nodes([([sys.executable], {**ENV, **slurm, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)})
                     for rank in (0, 1)], args, tmp_path)
    assert "training with 2 ranks" in log
    assert_losses_close(losses(log), single_node(args))


def _install_ssh() -> str | None:
    """Make sure ``sshd`` and ``pdsh`` exist (apt-get as root when they do not); why not, if not."""
    if shutil.which("pdsh") and os.path.exists("/usr/sbin/sshd"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "pdsh or openssh-server is missing and this user cannot install them (not root, or no apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server",
                                          "pdsh"]):
        result = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            return f"'{' '.join(step)}' failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _start_sshd(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """An sshd of this test's own on 127.0.0.1 (a free port, its own host key), letting in the
    holder of a fresh key: (the daemon, its port, the client key)."""
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    authorized = tmp_path / "authorized_keys"
    shutil.copy(tmp_path / "client_key.pub", authorized)
    authorized.chmod(0o600)
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege-separation directory
    port = free_port()
    daemon = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-h", str(tmp_path / "host_key"),
                               "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={authorized}",
                               "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "UsePAM=no",
                               "-o", "PermitRootLogin=prohibit-password", "-o", "PidFile=none"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sshd.log", "w"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return daemon, port, tmp_path / "client_key"
        assert daemon.poll() is None, (tmp_path / "sshd.log").read_text()
        time.sleep(0.1)
    daemon.kill()
    raise AssertionError("sshd did not listen within 30 s: " + (tmp_path / "sshd.log").read_text())


def test_deepspeed_over_pdsh_and_ssh_equals_one_node(zero1: list[str], demo_corpus: Path, tmp_path: Path) -> None:
    """DeepSpeed's default multi-node launch: ``deepspeed --hostfile`` runs pdsh, which starts each
    node's launcher over ssh (here to this machine, as "localhost" and "127.0.0.1")."""
    reason = _install_ssh()
    if reason:
        pytest.skip(reason)
    daemon, port, key = _start_sshd(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    remote_env = tmp_path / "deepspeed_env"  # what DeepSpeed exports on every node, besides PYTHON*
    remote_env.write_text("OMP_NUM_THREADS=1\n")
    env = {**ENV, "DS_ENV_FILE": str(remote_env),
           "PDSH_SSH_ARGS_APPEND": f"-i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                   "-o BatchMode=yes -o LogLevel=ERROR"}
    args = [*BASE, *zero1, "--save", str(tmp_path / "ckpt"), "--save-interval", "1000"]
    try:
        log = run_nodes([([*DEEPSPEED, "--hostfile", str(hostfile), "--ssh_port", str(port), "--no_ssh_check",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port())], env)], args, tmp_path)
    finally:
        # The nodes' processes are sshd's children, not the launcher's.
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "ckpt")], check=False)
        daemon.kill()
    assert "localhost: " in log and "127.0.0.1: " in log, log[-3000:]  # pdsh's prefix of each node's lines
    assert "training with 2 ranks" in log and "backend deepspeed" in log
    assert_losses_close(losses(log), single_node([*BASE, *zero1]))


def test_a_killed_worker_is_restarted_and_the_run_continues_exactly(demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    args = [*BASE, "--save", str(save), "--load", str(save), "--save-interval", "4"]
    log_path = tmp_path / "node.log"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--master_port", str(free_port())]
    node = start_node(launcher, "pretrain_gpt2.py", args, log_path)
    try:
        deadline = time.monotonic() + 300
        while 5 not in losses(log_path.read_text()):
            assert time.monotonic() < deadline and node.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        workers = sorted(int(pid) for pid in subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True,
                                                            text=True).stdout.split())
        os.kill(workers[-1], signal.SIGKILL)
        assert node.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        kill_node(node)
    log = log_path.read_text()
    marker = "restart 1 of at most 1 (torchrun)"
    assert marker in log and "resumed at iteration" in log.split(marker)[1].splitlines()[0], log[-3000:]
    resumed = losses(log.split(marker)[1])
    assert resumed and max(resumed) == ITERS and min(resumed) in (5, 9), resumed
    assert_losses_close(resumed, {i: v for i, v in single_node(BASE).items() if i in resumed})
