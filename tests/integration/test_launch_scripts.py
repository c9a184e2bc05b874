"""The launch scripts' multi-node variables reach the right launcher (issue 18): an elastic torchrun
rendezvous (RDZV_ENDPOINT, MIN_NODES, MAX_RESTARTS) and DeepSpeed's hostfile without ssh
(HOSTFILE, NO_SSH, NODE_RANK), each on this machine as one "node", two CPU ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
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


def test_a_user_error_under_torchrun_ends_with_one_line_and_its_exit_code(demo_corpus: Path, tmp_path: Path) -> None:
    """torchrun ended a rank's one-line user error with its ChildFailedError traceback and exit 1."""
    (tmp_path / "file").write_text("")
    result = _script("pretrain_gpt2_model_parallel.sh", {"CHECKPOINT_PATH": str(tmp_path / "file")}, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--save directory" in result.stderr and "is not writable" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pretrain_gpt2.py failed: rank ") and "exited with code 2" in last, last


def test_a_deepspeed_hostfile_launch_without_ssh(demo_corpus: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    port = free_port()
    result = _script("ds_pretrain_gpt2.sh", {"HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": "0",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(losses(result.stdout)) == {1, 2, 3} and "backend deepspeed" in result.stdout
    # The demo's defaults: bf16 where this CPU computes it natively, and two drawn samples at the end.
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert ("--bf16" in result.stdout + result.stderr) == native_bf16, result.stdout[-3000:]
    samples = result.stdout[result.stdout.index("samples from"):]
    assert "(--top_k 40 --temperature 0.8 --seed 1234):" in samples.splitlines()[0], samples
    assert "\n  1. Return the number of" in samples and "\n  2. This module provides" in samples, samples
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank in /dev/shm) are removed at a clean exit.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    """It ran: 8 s a demo step on a CPU, every step skipped by the loss scaler, 900 of them."""
    assert_one_line_error(_script("ds_pretrain_gpt2.sh", {"PRECISION": "fp16"}, tmp_path),
                          "PRECISION=fp16 needs a GPU", "use PRECISION=bf16 or fp32")


def test_the_samples_are_a_note_when_no_temporary_file_can_be_made(demo_corpus: Path, tmp_path: Path) -> None:
    """An unwritable TMPDIR turned a finished run into exit 1 with a bare bash error; training
    succeeded, so the script says why there are no samples and exits 0."""
    result = _script("pretrain_gpt2.sh", {"TMPDIR": str(tmp_path / "missing")}, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: no demo samples: cannot write a temporary file in" in result.stderr
    assert "samples from" not in result.stdout and "No such file" not in result.stderr


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
    ({"RDZV_ENDPOINT": "::1"}, "write an IPv6 address in brackets"),
    ({"RDZV_ENDPOINT": "host1:29500:1"}, "has more than one ':'"),
    ({"NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR (node 0's host name) and MASTER_PORT"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NNODES=2 needs MASTER_ADDR (node 0's host name) and MASTER_PORT"),
    ({"TRAIN_ITERS": "abc"}, "TRAIN_ITERS=abc must be an integer from 1"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE=0 must be an integer from 1"),
], ids=["node rank past nodes", "negative node rank", "nodes text", "no nodes", "no ranks", "port", "min nodes",
        "negative restarts", "endpoint port", "bare ipv6", "two colons", "no master", "no master port",
        "iterations text", "no batch"])
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
    ("n1 slots=2\nn1 slots=2\n", {}, "lists n1 twice"),
    ("n1 slots=1\nn2 slots=1\n", {"NO_SSH": "1"}, "NO_SSH=1 with NNODES=2 needs MASTER_ADDR"),
    ("n1 slots=1\n", {"NO_SSH": "yes"}, "NO_SSH=yes must be 1"),
], ids=["empty", "slots text", "no slots", "more nodes than hosts", "node rank past hosts", "directory", "duplicate",
        "no master without ssh", "no_ssh text"])
def test_a_bad_hostfile_is_one_line(hostfile: str | None, env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    if hostfile is None:
        path.mkdir()
    else:
        path.write_text(hostfile)
    assert_one_line_error(_script("ds_pretrain_gpt2.sh", {"HOSTFILE": str(path), **env}, tmp_path), fragment)


@pytest.mark.parametrize("rank", ["1", "abc"])
def test_a_bad_node_rank_without_a_hostfile_is_one_line(rank: str, tmp_path: Path) -> None:
    """Without a hostfile the DeepSpeed scripts run one node: NODE_RANK=1 (or text) was ignored,
    and only the missing samples (rank 0's node prints them) showed it."""
    assert_one_line_error(_script("ds_pretrain_gpt2.sh", {"NODE_RANK": rank}, tmp_path),
                          f"NODE_RANK={rank} must be an integer from 0 to 0")


@pytest.mark.parametrize("script", ["ds_pretrain_bert.sh", "pretrain_bert.sh"])
@pytest.mark.parametrize("env,fragment", [
    ({"NNODES": "2"}, "NNODES=2 must be an integer from 1 to 1 (the BERT scripts run on one node"),
    ({"NODE_RANK": "1"}, "NODE_RANK=1 must be an integer from 0 to 0"),
    ({"HOSTFILE": "/no/such/hosts"}, "the BERT scripts run on one node (HOSTFILE and RDZV_ENDPOINT"),
    ({"TRAIN_ITERS": "abc"}, "TRAIN_ITERS=abc must be an integer"),
    ({"MP": "0"}, "MP=0 must be an integer from 1"),
], ids=["nodes", "node rank", "hostfile", "iterations text", "no model parallel"])
def test_a_bad_bert_script_variable_is_one_line(script: str, env: dict[str, str], fragment: str,
                                                tmp_path: Path) -> None:
    """The BERT scripts ignored the multi-node variables (a 'second node' ran a one-node job of its
    own on the same checkpoint directory) and passed text through to argparse's usage dump."""
    assert_one_line_error(_script(script, env, tmp_path), fragment)


@pytest.mark.parametrize("script", ["ds_pretrain_gpt2.sh", "ds_pretrain_bert.sh"])
def test_a_script_run_by_a_relative_path_from_elsewhere(script: str) -> None:
    """The scripts cd to the repository before sourcing their helpers: a helper sourced by a path
    relative to the caller's directory was not found."""
    result = subprocess.run(["bash", f"{REPO.name}/scripts/{script}"], cwd=REPO.parent, env={**ENV, "NODE_RANK": "1"},
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "NODE_RANK=1 must be an integer from 0 to 0")


def test_several_deepspeed_nodes_need_a_hostfile(tmp_path: Path) -> None:
    """Without one each node ran a one-node job of its own on the same checkpoint directory."""
    assert_one_line_error(_script("ds_pretrain_gpt2.sh", {"NNODES": "2", "NODE_RANK": "1", "NO_SSH": "1"}, tmp_path),
                          "the DeepSpeed scripts start several nodes from HOSTFILE")


def _fake_launchers(tmp_path: Path) -> dict[str, str]:
    """A ``deepspeed`` that prints its arguments and exits 0 (first on PATH); ``megatron.torchrun``
    does the same under MEGATRON_TEST_LAUNCH_ECHO=1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("deepspeed",):
        (bin_dir / name).write_text("#!/bin/sh\necho LAUNCH $0 \"$@\"\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{ENV['PATH']}", "MEGATRON_TEST_LAUNCH_ECHO": "1"}  # megatron.torchrun echoes


@pytest.mark.parametrize("script,env,hostfile,expected", [
    ("ds_pretrain_gpt2.sh", {}, "# two nodes\r\nn1 slots=01\r\n\r\n\tn2\tslots=2  # the second\r\n",
     "--hostfile {hostfile} --num_nodes 2 --num_gpus 2 pretrain_gpt2.py"),
    ("ds_pretrain_gpt2.sh", {"NNODES": "1"}, "n1 slots=1\nn2 slots=1\n", "--num_nodes 1"),
    ("pretrain_gpt2_model_parallel.sh", {"NNODES": "08", "NODE_RANK": "07", "MASTER_ADDR": "n0",
                                         "MASTER_PORT": "029500"}, None,
     "--nnodes 8 --node_rank 7 --master_addr n0 --master_port 29500"),
    ("pretrain_gpt2_model_parallel.sh", {"RDZV_ENDPOINT": "[::1]", "NODE_RANK": "5"}, None,
     "--rdzv-endpoint [::1]"),
], ids=["crlf comments tabs leading zero", "fewer nodes than hosts", "leading zeros", "ipv6 elastic"])
def test_what_the_launchers_are_given(script: str, env: dict[str, str], hostfile: str | None, expected: str,
                                      tmp_path: Path) -> None:
    if hostfile is not None:
        (tmp_path / "hosts").write_text(hostfile, newline="")
        env = {**env, "HOSTFILE": str(tmp_path / "hosts")}
    result = _script(script, {**env, **_fake_launchers(tmp_path)}, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected.format(hostfile=tmp_path / "hosts") in result.stdout, result.stdout[-2000:]
