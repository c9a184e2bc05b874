"""Reliability: crash-safe checkpoints under SIGKILL, no hangs when a rank dies, SIGTERM,
non-finite losses, and safe loading. Real processes throughout."""

from __future__ import annotations

import ast
import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launchers import ENV, REPO, TINY_GPT2, command, free_port, losses, run_script


def _command(args: list[str]) -> list[str]:
    return command("pretrain_gpt2.py", [*TINY_GPT2, "--batch-size", "2", *args])


def _run(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_script("pretrain_gpt2.py", [*TINY_GPT2, "--batch-size", "2", *args], timeout=timeout, check=False,
                      env=env)


def _ds_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def _kill_during_training(args: list[str], after_iteration: int, delay: float, in_save: bool = False) -> None:
    """Start training, SIGKILL it ``delay`` seconds after it logs ``after_iteration`` (with
    ``in_save``: after it announces that iteration's checkpoint, so the kill lands in its write)."""
    proc = subprocess.Popen(_command(args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    pattern = re.compile(rf"saving checkpoint at iteration\s+{after_iteration} " if in_save
                         else rf"iteration\s+{after_iteration}/")
    for line in proc.stdout:
        if pattern.search(line):
            break
    time.sleep(delay)
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("deepspeed", [False, True], ids=["megatron", "deepspeed"])
def test_sigkill_during_checkpointing_never_loses_the_run(deepspeed: bool, async_save: bool, demo_corpus: Path,
                                                          tmp_path: Path) -> None:
    extra = _ds_config(tmp_path) if deepspeed else []
    train = ["--train-iters", "12", "--lr-decay-iters", "12"] + extra
    straight = losses(_run(train).stdout)
    rng = random.Random(1234 + deepspeed)
    killed_mid_save = 0
    trials = 6 if async_save else 10  # a background save keeps its staging longer: kills land in it more often
    for trial in range(trials):
        save = tmp_path / f"trial{trial}"
        resumable = train + ["--save", str(save), "--load", str(save), "--save-interval", "1"]
        resumable += ["--async-save"] if async_save else []
        # Every other kill is aimed at a checkpoint write (a tiny model's save takes tens of
        # milliseconds, so random kills alone rarely land in one); the rest fall anywhere.
        in_save = trial % 2 == 0
        _kill_during_training(resumable, after_iteration=rng.randint(2, 6),
                              delay=rng.uniform(0.0, 0.02) if in_save else rng.uniform(0.0, 0.4), in_save=in_save)
        killed_mid_save += bool(list(save.glob("*.tmp")))
        resumed = _run(resumable)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        printed = losses(resumed.stdout)
        if not printed:  # killed after the final checkpoint: the relaunch finds the run finished
            assert "loaded checkpoint" in resumed.stdout and "at iteration 12" in resumed.stdout, resumed.stdout[-1500:]
            continue
        first = min(printed)
        assert "loaded checkpoint" in resumed.stdout or first == 1
        assert printed == {i: straight[i] for i in range(first, 13)}, f"trial {trial}"
        assert not list(save.glob("*.tmp")), "a staging directory survived the relaunch's saves"
    # Evidence that the kills hit checkpoint writes, not only the steps between them.
    assert killed_mid_save >= 2, f"only {killed_mid_save} of {trials} kills landed while a checkpoint was being written"


def test_a_dead_rank_does_not_hang_the_others(demo_corpus: Path) -> None:
    port = str(free_port())
    args = _command(["--train-iters", "100000", "--distributed-timeout-minutes", "1", "--log-interval", "1"])
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for line in procs[0].stdout:
        if re.search(r"iteration\s+3/", line):
            break
    procs[1].kill()
    started = time.monotonic()
    try:
        _, stderr = procs[0].communicate(timeout=60 + 60)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode not in (0, None)
    assert time.monotonic() - started < 120
    assert "another rank most likely died" in stderr, stderr[-2000:]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_loadable_checkpoint(stop: signal.Signals, demo_corpus: Path, tmp_path: Path) -> None:
    """With --exit-signal-handler, SIGTERM and SIGINT (Ctrl-C; a KeyboardInterrupt traceback and
    nothing saved before issue 16) both save and exit 0."""
    save = tmp_path / "ckpt"
    args = ["--train-iters", "100000", "--lr-decay-iters", "100", "--save", str(save), "--save-interval", "100000",
            "--exit-signal-handler"]
    proc = subprocess.Popen(_command(args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if re.search(r"iteration\s+4/", line):
            break
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "exiting at iteration" in stdout and f"({stop.name}), checkpoint saved" in stdout
    assert "Traceback" not in stderr
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 4 and (save / f"iter_{iteration:07d}" / "complete").is_file()
    resumed = _run(["--train-iters", str(iteration + 2), "--lr-decay-iters", "100", "--load", str(save)])
    assert resumed.returncode == 0 and f"at iteration {iteration}" in resumed.stdout
    assert set(losses(resumed.stdout)) == {iteration + 1, iteration + 2}


@pytest.mark.parametrize("deepspeed", [False, True], ids=["megatron", "deepspeed"])
def test_nan_loss_is_skipped_and_counted(deepspeed: bool, demo_corpus: Path, tmp_path: Path) -> None:
    extra = _ds_config(tmp_path) if deepspeed else []
    out = _run(["--train-iters", "8", "--log-interval", "4", "--bf16"] + extra,
               env=dict(ENV, MEGATRON_TEST_INJECT_NAN="2,3"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"iteration\s+4/.*number of skipped iterations\s+2 \|", out.stdout), out.stdout[-2000:]
    assert re.search(r"iteration\s+8/.*number of skipped iterations\s+0 \|", out.stdout)
    assert all(value != "nan" and float(value) == float(value) for value in losses(out.stdout).values())


@pytest.mark.parametrize("deepspeed", [False, True], ids=["megatron", "deepspeed"])
def test_persistent_nan_stops_the_run_without_saving_it(deepspeed: bool, demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    extra = _ds_config(tmp_path) if deepspeed else []
    out = _run(["--train-iters", "30", "--save", str(save), "--save-interval", "2", "--max-skipped-steps", "3"] + extra,
               env=dict(ENV, MEGATRON_TEST_INJECT_NAN="5-"))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "3 consecutive iterations (up to 7) had a non-finite loss" in out.stderr
    # Iterations 5 and 6 were skipped: the checkpoint at 6 holds the (finite) weights of 4.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert "Traceback" not in out.stderr
    if not deepspeed:
        paths = [save / f"iter_000000{i}" / "mp_rank_00" / "model_optim_rng.pt" for i in (4, 6)]
        at4, at6 = (torch.load(path, weights_only=True)["model"] for path in paths)
        for name, tensor in at6.items():
            assert torch.isfinite(tensor).all() and torch.equal(tensor, at4[name]), name


def _torch_load_calls_without_weights_only(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(keyword.arg == "weights_only" for keyword in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_every_torch_load_passes_weights_only() -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed, "git ls-files found no Python files"
    offenders = [f"{name}:{line}" for name in listed if (REPO / name).is_file()
                 for line in _torch_load_calls_without_weights_only((REPO / name).read_text())]
    assert not offenders, "torch.load without an explicit weights_only: " + ", ".join(offenders)


def test_keep_last_n_keeps_the_newest(demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    out = _run(["--train-iters", "6", "--save", str(save), "--save-interval", "1", "--keep-last-n", "2"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000005", "iter_0000006"]
    torch.load(save / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
