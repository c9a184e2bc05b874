"""Nothing lost, nothing silent, nobody hangs, through the real entry points and launchers.

Verified checkpoints (a damaged newest one is skipped for the previous one, and the resumed run
continues the straight run exactly), one writer per --save, readers that never change what they
read, no worker outliving its launcher, a full disk, tokenizer identity, optimizer state (SIGINT is
in test_reliability.py with SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from checkpoint_helpers import tree_digest
from launchers import (
    ENV,
    REPO,
    TINY_GPT2,
    TOKENIZER,
    command,
    free_port,
    losses,
    run_script,
    run_tool,
)

TRAIN = TINY_GPT2 + ["--batch-size", "2"]


def _run(args: list[str], env: dict | None = None, nprocs: int | None = None) -> subprocess.CompletedProcess:
    return run_script("pretrain_gpt2.py", TRAIN + args, nprocs, timeout=300, check=False, env=env)


def _digest(root: Path) -> str:
    """Every file under ``root`` except the writer lock (a run's lock is not checkpoint data)."""
    return tree_digest(root, skip=(".writer.lock",))


def _iterations(save: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in save.glob("iter_*") if p.name[5:].isdigit() and (p / "complete").exists())


def _one_error_line(out: subprocess.CompletedProcess, fragment: str) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert errors and fragment in errors[0], out.stderr[-3000:]
    assert f'File "{REPO}' not in out.stderr, "a traceback of our code was printed"
    return errors[0]


@pytest.fixture(scope="module")
def straight(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    """A 12-iteration run saving every 4 iterations, and its printed losses."""
    save = tmp_path_factory.mktemp("straight") / "ckpt"
    out = _run(["--train-iters", "12", "--lr-decay-iters", "12", "--save", str(save), "--save-interval", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    return save, losses(out.stdout)


def test_a_flipped_bit_falls_back_to_the_previous_checkpoint(straight, tmp_path: Path) -> None:
    source, expected = straight
    save = tmp_path / "ckpt"
    shutil.copytree(source, save)
    shutil.rmtree(save / "iter_0000012")  # the run stopped after its iteration-8 checkpoint
    (save / "latest_checkpointed_iteration.txt").write_text("8\n")
    target = save / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(target.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 2000 * 4, 4):  # 2,000 sign bits, as the case
        data[offset + 3] ^= 0x80
    target.write_bytes(bytes(data))
    out = _run(["--train-iters", "12", "--lr-decay-iters", "12", "--save", str(save), "--load", str(save),
                "--save-interval", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING: checkpoint" in out.stdout and "iter_0000008 is damaged: mp_rank_00/model_optim_rng.pt does " \
        "not match its SHA-256" in out.stdout
    assert "loaded checkpoint" in out.stdout and "iter_0000004 at iteration 4" in out.stdout
    assert losses(out.stdout) == {i: expected[i] for i in range(5, 13)}
    # Reaching iteration 8 again, the run writes a new iter_0000008 and keeps the damaged one aside.
    kept = list(save.glob("iter_0000008.replaced-*"))
    assert len(kept) == 1 and "it was kept as" in out.stdout
    assert (kept[0] / "mp_rank_00" / "model_optim_rng.pt").read_bytes() == bytes(data)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_deepspeed_file_falls_back_too(demo_corpus: Path, tmp_path: Path) -> None:
    """The manifest covers DeepSpeed's files: one flipped bit in ZeRO's optimizer partition of the
    newest checkpoint is named and the previous one resumes exactly; with every checkpoint
    damaged the run stops (exit 2) and changes nothing."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    train = ["--train-iters", "8", "--lr-decay-iters", "8", "--save-interval", "4", "--deepspeed",
             "--deepspeed_config", str(config)]
    straight_run = _run(train + ["--save", str(tmp_path / "straight")])
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    expected = losses(straight_run.stdout)
    save = tmp_path / "ckpt"
    shutil.copytree(tmp_path / "straight", save)
    newest = next((save / "iter_0000008").glob("*zero_pp_rank_0*optim_states.pt"))
    _flip_a_byte(newest)
    out = _run(train + ["--save", str(save), "--load", str(save)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"iter_0000008 is damaged: {newest.name} does not match its SHA-256" in out.stdout
    assert "iter_0000004 at iteration 4" in out.stdout
    assert losses(out.stdout) == {i: expected[i] for i in range(5, 9)}

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "straight", broken)
    for iteration in ("iter_0000004", "iter_0000008"):
        _flip_a_byte(next((broken / iteration).glob("*zero_pp_rank_0*optim_states.pt")))
    before = _digest(broken)
    out = _run(train + ["--train-iters", "12", "--save", str(broken), "--load", str(broken)])
    assert out.returncode == 2, out.stderr[-3000:]
    _one_error_line(out, f"every complete checkpoint under {broken} is corrupt or incomplete")
    assert _digest(broken) == before


def test_a_marker_without_its_files_falls_back(straight, tmp_path: Path) -> None:
    source, _ = straight
    save = tmp_path / "ckpt"
    shutil.copytree(source, save)
    shutil.rmtree(save / "iter_0000012" / "mp_rank_00")
    out = _run(["--train-iters", "12", "--lr-decay-iters", "12", "--save", str(save), "--load", str(save),
                "--save-interval", "100"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mp_rank_00/model_optim_rng.pt is missing" in out.stdout and "iter_0000008 at iteration 8" in out.stdout


def test_an_unreadable_tracker_is_named_and_the_newest_checkpoint_loads(straight, tmp_path: Path) -> None:
    """A tracker of non-UTF-8 bytes was a UnicodeDecodeError traceback."""
    source, _ = straight
    save = tmp_path / "ckpt"
    shutil.copytree(source, save)
    (save / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe1\x002")
    out = _run(["--train-iters", "12", "--lr-decay-iters", "12", "--save", str(save), "--load", str(save)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "latest_checkpointed_iteration.txt does not hold an iteration number; taking the newest" in out.stdout
    assert "iter_0000012 at iteration 12" in out.stdout


def test_a_second_writer_is_refused_and_the_first_run_is_undisturbed(demo_corpus: Path, tmp_path: Path) -> None:
    train = ["--train-iters", "1000", "--lr-decay-iters", "1000", "--log-interval", "100", "--save-interval", "500"]
    alone = _run(train + ["--save", str(tmp_path / "alone")])
    assert alone.returncode == 0, alone.stderr[-3000:]
    save = tmp_path / "ckpt"
    args = command("pretrain_gpt2.py", TRAIN + train + ["--save", str(save), "--load", str(save)])
    first = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if re.search(r"iteration\s+100/", line):
            break
    started = time.monotonic()
    second = _run(train + ["--save", str(save), "--load", str(save)])
    assert second.returncode == 2 and time.monotonic() - started < 60
    _one_error_line(second, f"--save {save} is being written by another run (pid {first.pid} on ")
    rest, _ = first.communicate(timeout=300)
    assert first.returncode == 0
    assert losses("".join(lines) + rest) == losses(alone.stdout)


def test_a_reader_never_changes_the_directory_it_reads(straight, tmp_path: Path) -> None:
    """--load LIVE --finetune --save OTHER while LIVE has a save in flight: LIVE is untouched."""
    source, _ = straight
    live = tmp_path / "live"
    shutil.copytree(source, live)
    (live / "iter_0000016.tmp" / "mp_rank_00").mkdir(parents=True)  # a save in flight
    (live / "iter_0000016.tmp" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"partial")
    before = _digest(live)
    out = _run(["--train-iters", "2", "--load", str(live), "--finetune", "--save", str(tmp_path / "other")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert _digest(live) == before


def _workers(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_killing_the_launcher_leaves_no_worker_and_no_new_checkpoint(launcher: str, demo_corpus: Path,
                                                                     tmp_path: Path) -> None:
    save = tmp_path / f"ckpt-{launcher}"
    train = TRAIN + ["--train-iters", "100000", "--lr-decay-iters", "100", "--save", str(save), "--save-interval", "1"]
    if launcher == "torchrun":
        args = command("pretrain_gpt2.py", train, nprocs=2)
    else:
        config = tmp_path / "ds.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
        args = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                "pretrain_gpt2.py", *train, "--deepspeed", "--deepspeed_config", str(config)]
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if re.search(r"iteration\s+3/", line):
            break
    proc.kill()  # the launcher only: its workers are in their own sessions
    proc.wait()
    killed_at = time.monotonic()
    allowed = set(_iterations(save)) | {int(p.name[5:12]) for p in save.glob("iter_*.tmp")}  # a save in flight
    while _workers(str(save)) and time.monotonic() - killed_at < 10:
        time.sleep(0.2)
    left = _workers(str(save))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers still running 10 s after the launcher died: {left}"
    time.sleep(1)
    assert set(_iterations(save)) <= allowed, "a checkpoint was written after the launcher died"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 12 MB tmpfs (one checkpoint of the tiny model is 7.4 MB); skips if it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_loses_nothing(async_save: bool, small_disk: Path, demo_corpus: Path) -> None:
    """With --async-save the checkpoint that does not fit fails in the background, and the run
    stops at its end with the same line."""
    save = small_disk / "ckpt"
    args = ["--train-iters", "4", "--lr-decay-iters", "4", "--save", str(save), "--load", str(save), "--save-interval", "2"]
    args += ["--async-save"] if async_save else []
    out = _run(args)
    assert out.returncode == 1, out.stderr[-3000:]
    line = _one_error_line(out, "checkpoint iter_0000004 could not be written to")
    assert "MB free there" in line and "iter_0000002, is intact" in line
    assert _iterations(save) == [2] and not list(save.glob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "iter_0000002 at iteration 2" in resumed.stdout and _iterations(save) == [2, 4]


def test_resuming_without_optimizer_state_is_refused(demo_corpus: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    assert _run(["--train-iters", "2", "--save", str(save), "--no-save-optim"]).returncode == 0
    before = _digest(save)
    out = _run(["--train-iters", "4", "--save", str(save), "--load", str(save)])
    assert out.returncode == 2 and _digest(save) == before
    _one_error_line(out, "holds no optimizer state (saved with --no-save-optim): pass --no-load-optim")
    fresh = _run(["--train-iters", "4", "--save", str(save), "--load", str(save), "--no-load-optim"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]


def _other_tokenizer(tmp_path: Path) -> list[str]:
    """The demo tokenizer less its last merge: the same vocabulary size, other files."""
    vocab, merges = TOKENIZER[1], TOKENIZER[3]
    lines = Path(merges).read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "merges.txt").write_text("".join(lines[:-1]), encoding="utf-8")
    return ["--vocab-file", vocab, "--merge-file", str(tmp_path / "merges.txt")]


def test_another_tokenizer_is_refused_for_training_generation_and_export(straight, tmp_path: Path) -> None:
    source, _ = straight
    save = tmp_path / "ckpt"
    shutil.copytree(source, save)
    before = _digest(save)
    out = _run(["--train-iters", "14", "--save", str(save), "--load", str(save), *_other_tokenizer(tmp_path)])
    assert out.returncode == 2 and _digest(save) == before
    _one_error_line(out, "was trained with another tokenizer (tokenizer_sha256: checkpoint ")
    generated = run_tool("generate_samples.py", "--load", str(save), *_other_tokenizer(tmp_path), "--greedy",
                         "--num-samples", "1", "--make-vocab-size-divisible-by", "40", check=False)
    assert generated.returncode == 2
    _one_error_line(generated, "was trained with another tokenizer")
    exported = _convert("to-hf", "--load", str(save), "--output", str(tmp_path / "hf"), *_other_tokenizer(tmp_path))
    assert exported.returncode == 2 and not (tmp_path / "hf").exists()
    _one_error_line(exported, "was trained with another tokenizer")
    allowed = _run(["--train-iters", "13", "--save", str(save), "--load", str(save), *_other_tokenizer(tmp_path),
                    "--override-tokenizer-check"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]


def test_master_port_in_use_is_one_line(demo_corpus: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run(["--train-iters", "1"], env=dict(ENV, MASTER_PORT=str(port)))
    assert out.returncode == 2
    _one_error_line(out, f"MASTER_PORT {port} on 127.0.0.1 is already in use")


def _convert(*args: str) -> subprocess.CompletedProcess:
    return run_tool("tools/convert_checkpoint.py", *args, check=False)


def test_tools_never_write_into_a_run(straight, tmp_path: Path) -> None:
    source, _ = straight
    run = tmp_path / "run"
    shutil.copytree(source, run)
    link = tmp_path / "link"
    link.symlink_to(run)
    hf = tmp_path / "hf"
    assert _convert("to-hf", "--load", str(run), "--output", str(hf), *TOKENIZER).returncode == 0
    before = _digest(run)
    cases = [
        (("from-hf", "--input", str(hf), "--save", str(run), "--model-parallel-size", "1"), "already holds a run"),
        (("reshard", "--load", str(run), "--save", str(link), "--model-parallel-size", "2"), "is --load"),
        (("reshard", "--load", str(hf), "--save", str(run), "--model-parallel-size", "2"), "already holds a run"),
        (("to-hf", "--load", str(run), "--output", str(run / "latest_checkpointed_iteration.txt")), "is a file"),
        (("to-hf", "--load", str(run), "--output", str(hf)), "already holds model.safetensors"),
    ]
    for args, fragment in cases:
        out = _convert(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        _one_error_line(out, fragment)
    assert _digest(run) == before


@pytest.mark.parametrize("content,fragment", [("{not json", "is not valid JSON"),
                                              ('{"model_type": "gpt2", "n_layer": 2}', "lacks positive integers")])
def test_from_hf_with_a_bad_config_is_one_line(content: str, fragment: str, straight, tmp_path: Path) -> None:
    source, _ = straight
    hf = tmp_path / "hf"
    assert _convert("to-hf", "--load", str(source), "--output", str(hf), *TOKENIZER).returncode == 0
    (hf / "config.json").write_text(content)
    out = _convert("from-hf", "--input", str(hf), "--save", str(tmp_path / "new"), "--model-parallel-size", "1")
    assert out.returncode == 2
    _one_error_line(out, fragment)
    assert not _iterations(tmp_path / "new")
