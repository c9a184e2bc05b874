"""The launch scripts' multi-node variables reach the right launcher (issue 18): an elastic torchrun
rendezvous (RDZV_ENDPOINT, MIN_NODES, MAX_RESTARTS) and DeepSpeed's hostfile without ssh
(HOSTFILE, NO_SSH, NODE_RANK), each on this machine as one "node", two CPU ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launchers import ENV, REPO, assert_one_line_error, free_port, losses

SHORT = ["--eval-iters", "0", "--log-interval", "1", "--save-interval", "1000"]


def _script(name: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    environ = {**ENV, "TRAIN_ITERS": "3", "CHECKPOINT_PATH": str(tmp_path / "ckpt"), **env}
    return subprocess.run(["bash", f"scripts/{name}", *SHORT], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=600)


def test_an_elastic_torchrun_launch(demo_corpus: Path, tmp_path: Path) -> None:
    result = _script("pretrain_gpt2_model_parallel.sh", {"RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
                                                         "MIN_NODES": "1", "MAX_RESTARTS": "1"}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(losses(result.stdout)) == {1, 2, 3} and "model parallel 2" in result.stdout


def test_a_deepspeed_hostfile_launch_without_ssh(demo_corpus: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    result = _script("ds_pretrain_gpt2.sh", {"HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": "0",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(losses(result.stdout)) == {1, 2, 3} and "backend deepspeed" in result.stdout


def test_a_missing_hostfile_is_one_line(tmp_path: Path) -> None:
    result = _script("ds_pretrain_gpt2.sh", {"HOSTFILE": str(tmp_path / "none")}, tmp_path)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: HOSTFILE"), result.stderr[-2000:]


@pytest.mark.parametrize("env,fragment", [
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be an integer from 0 to 1"),
    ({"NODE_RANK": "-1"}, "NODE_RANK=-1 must be an integer from 0 to 0"),
    ({"NNODES": "abc"}, "NNODES=abc must be an integer"),
    ({"NNODES": "0"}, "NNODES=0 must be an integer from 1"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 must be an integer from 1"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 must be an integer from 1 to 65535"),
    ({"RDZV_ENDPOINT": "127.0.0.1:29555", "MIN_NODES": "3", "NNODES": "2"}, "MIN_NODES=3 must be an integer from 1 to 2"),
    ({"RDZV_ENDPOINT": "127.0.0.1:29555", "MAX_RESTARTS": "-1"}, "MAX_RESTARTS=-1 must be an integer"),
    ({"RDZV_ENDPOINT": "127.0.0.1:notaport"}, "RDZV_PORT=notaport must be an integer from 1 to 65535"),
], ids=["node rank past nodes", "negative node rank", "nodes text", "no nodes", "no ranks", "port", "min nodes",
        "negative restarts", "endpoint port"])
def test_a_bad_torchrun_variable_is_one_line(env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    """Each of these hung (torchrun waiting for a node that never comes) or printed a torchrun traceback."""
    assert_one_line_error(_script("pretrain_gpt2_model_parallel.sh", env, tmp_path), fragment)


@pytest.mark.parametrize("hostfile,env,fragment", [
    ("", {}, "lists no host"),
    ("localhost slots=abc\n", {}, "has a line that is not 'host slots=N'"),
    ("localhost slots=0\n", {}, "has a line that is not 'host slots=N'"),
    ("localhost slots=1\n", {"NNODES": "2"}, "NNODES=2 must be an integer from 1 to 1"),
    ("localhost slots=1\n", {"NO_SSH": "1", "NODE_RANK": "3"}, "NODE_RANK=3 must be an integer from 0 to 0"),
    (None, {}, "is not a file"),
], ids=["empty", "slots text", "no slots", "more nodes than hosts", "node rank past hosts", "directory"])
def test_a_bad_hostfile_is_one_line(hostfile: str | None, env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    if hostfile is None:
        path.mkdir()
    else:
        path.write_text(hostfile)
    assert_one_line_error(_script("ds_pretrain_gpt2.sh", {"HOSTFILE": str(path), **env}, tmp_path), fragment)
