"""The launch scripts' multi-node variables reach the right launcher (issue 18): an elastic torchrun
rendezvous (RDZV_ENDPOINT, MIN_NODES, MAX_RESTARTS) and DeepSpeed's hostfile without ssh
(HOSTFILE, NO_SSH, NODE_RANK), each on this machine as one "node", two CPU ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

from launchers import ENV, REPO, free_port, losses

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
