"""``--async-save``: checkpoints completed in the background are the checkpoints a synchronous
save writes, on both paths and with several ranks; the run continues exactly from each of them;
a stop signal and a bad configuration behave as with synchronous saves. (SIGKILL during an
asynchronous save: ``test_reliability.py``; a full disk: ``test_checkpoint_safety.py``.)"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from launchers import ENV, REPO, TINY_GPT2, command, losses, run_script

TRAIN = TINY_GPT2 + ["--batch-size", "2", "--train-iters", "8", "--lr-decay-iters", "8"]


def _run(args: list[str], nprocs: int | None = None) -> subprocess.CompletedProcess:
    return run_script("pretrain_gpt2.py", TRAIN + args, nprocs, timeout=300, check=False)


def _ds_config(tmp_path: Path, extra: dict | None = None) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **(extra or {})}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def _only(save: Path, iteration: int, into: Path) -> Path:
    """A run directory holding only checkpoint ``iteration`` of ``save``."""
    into.mkdir()
    tag = f"iter_{iteration:07d}"
    shutil.copytree(save / tag, into / tag)
    (into / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return into


@pytest.mark.parametrize("path", ["megatron", "deepspeed"])
def test_async_checkpoints_resume_exactly(path: str, demo_corpus: Path, tmp_path: Path) -> None:
    """Two ranks (data parallel 2; ZeRO 1 shards per rank on DeepSpeed) save every 2 iterations
    in the background; training from each checkpoint prints the straight run's losses, which
    shows each holds the state of its own iteration, not of a later step."""
    extra = _ds_config(tmp_path) if path == "deepspeed" else []
    save = tmp_path / "async"
    out = _run(extra + ["--save", str(save), "--save-interval", "2", "--async-save"], nprocs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    straight = losses(out.stdout)
    assert sorted(straight) == list(range(1, 9))
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert not list(save.glob("*.tmp"))
    for iteration in (2, 6):
        load = _only(save, iteration, tmp_path / f"from{iteration}")
        resumed = _run(extra + ["--load", str(load)], nprocs=2)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"at iteration {iteration}" in resumed.stdout
        assert losses(resumed.stdout) == {i: straight[i] for i in range(iteration + 1, 9)}


def test_a_stop_signal_waits_for_the_background_save(demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    args = TINY_GPT2 + ["--batch-size", "2", "--train-iters", "100000", "--lr-decay-iters", "100", "--save",
                        str(save), "--save-interval", "3", "--async-save", "--exit-signal-handler"]
    proc = subprocess.Popen(command("pretrain_gpt2.py", args), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.search(r"iteration\s+7/", line):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "(SIGTERM), checkpoint saved" in stdout
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 7 and (save / f"iter_{iteration:07d}" / "complete").is_file()
    assert not list(save.glob("*.tmp"))


def test_async_save_without_save_is_one_line(demo_corpus: Path) -> None:
    out = _run(["--async-save"])
    assert out.returncode == 2 and "--async-save changes how checkpoints are written" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_deepspeed_checkpoint_writer_is_one_line(async_save: bool, demo_corpus: Path, tmp_path: Path) -> None:
    """DeepSpeed's own fast/decoupled writer failed deep inside the engine (a traceback about the
    model-parallel unit)."""
    config = _ds_config(tmp_path, {"checkpoint": {"writer": {"type": "fast", "decoupled": False}}})
    out = _run(config + ["--save", str(tmp_path / "ckpt")] + (["--async-save"] if async_save else []))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "checkpoint.writer (DeepSpeed's fast or decoupled checkpoint writer) is not supported" in out.stderr
    assert "Traceback" not in out.stderr
