"""What a finished training run tells its user (issue 20): Megatron's checkpoint lines, a closing
summary whose next commands work as printed, TensorBoard events and ``loss.png`` in the
experiment directory."""

from __future__ import annotations

import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import ENV, REPO, TINY_GPT2, losses, run_script

TRAIN = TINY_GPT2 + ["--batch-size", "2", "--train-iters", "6", "--lr-decay-iters", "6", "--log-interval", "2"]


def _next_commands(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    start = lines.index("   next:")
    commands = {}
    for line in lines[start + 1:start + 4]:
        name, command = line.strip().split(":", 1)
        commands[name] = command.strip()
    return commands


def test_the_summary_names_everything_and_its_commands_work(demo_corpus: Path, tmp_path: Path) -> None:
    save, exp = tmp_path / "ckpt", tmp_path / "exp"
    out = run_script("pretrain_gpt2.py", TRAIN + ["--save", str(save), "--save-interval", "4", "--exp-dir", str(exp),
                                                  "--eval-interval", "2"], check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"saving checkpoint at iteration       4 to {save}" in out.stdout
    assert f"  successfully saved checkpoint at iteration       6 to {save}" in out.stdout
    assert " training summary: 6 iterations, 384 tokens in" in out.stdout
    assert "   final lm loss: train " in out.stdout and "| validation " in out.stdout
    assert f"   checkpoint:  {save / 'iter_0000006'}" in out.stdout
    assert f"   experiment:  {exp} " in out.stdout and "loss.png" in out.stdout
    assert f"   TensorBoard: tensorboard --logdir {exp / 'tb'}" in out.stdout
    assert list((exp / "tb").glob("events.out.tfevents.*")) and (exp / "loss.png").stat().st_size > 10_000
    commands = _next_commands(out.stdout)
    assert set(commands) == {"generate", "evaluate", "export"}
    for name, command in commands.items():
        argv = shlex.split(command)
        assert argv[0] == "python"
        done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=ENV, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{name}: {command}\n{done.stderr[-3000:]}"
    assert (Path(str(save) + "-hf") / "config.json").is_file()


def test_no_tensorboard_and_a_resumed_summary(demo_corpus: Path, tmp_path: Path) -> None:
    save, exp = tmp_path / "ckpt", tmp_path / "exp"
    first = run_script("pretrain_gpt2.py", TRAIN + ["--save", str(save), "--exp-dir", str(exp), "--no-tensorboard"],
                       check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (exp / "tb").exists() and "TensorBoard:" not in first.stdout
    more = [a if a != "6" else "8" for a in TRAIN]
    resumed = run_script("pretrain_gpt2.py", more + ["--save", str(save), "--load", str(save), "--exp-dir",
                                                     str(tmp_path / "exp2")], check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert " training summary: 2 iterations (resumed at iteration 6, now at 8), 128 tokens in" in resumed.stdout


def test_tensorboard_flags_that_contradict_are_one_line(demo_corpus: Path, tmp_path: Path) -> None:
    out = run_script("pretrain_gpt2.py", TRAIN + ["--no-tensorboard", "--tensorboard-dir", str(tmp_path)],
                     check=False)
    assert out.returncode == 2 and "--no-tensorboard and --tensorboard-dir" in out.stderr
    assert "Traceback" not in out.stderr


def _wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history rows (key -> JSON value) of an offline W&B run file: a LevelDB-style log (a
    7-byte file header, 32 KiB blocks of records with a 7-byte header: CRC, length, kind) of
    ``Record`` protobufs. wandb 0.31 no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data.startswith(b":W&B")
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:  # a whole record
            records.append(chunk)
        elif kind in (2, 3):  # first and middle pieces
            pending = (b"" if kind == 2 else pending) + chunk
        elif kind == 4:  # last piece
            records.append(pending + chunk)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_weights_and_biases_offline_logs_the_same_scalars(demo_corpus: Path, tmp_path: Path) -> None:
    wandb_dir = tmp_path / "wandb-runs"
    out = run_script("pretrain_gpt2.py", TRAIN + ["--exp-dir", str(tmp_path / "exp"), "--wandb-project", "demo",
                                                  "--wandb-dir", str(wandb_dir), "--wandb-run-name", "tiny",
                                                  "--eval-interval", "2"],
                     check=False, env=dict(ENV, WANDB_MODE="offline", WANDB_SILENT="true"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, sorted(str(p) for p in wandb_dir.rglob("*"))[:20]
    rows = _wandb_history(run_files[0])
    steps = [int(row["_step"]) for row in rows if "lm loss" in row]
    assert steps == [2, 4, 6], rows
    assert any("validation loss" in row for row in rows) and any("learning rate" in row for row in rows)


def test_wandb_flags_without_a_project_are_one_line(demo_corpus: Path, tmp_path: Path) -> None:
    out = run_script("pretrain_gpt2.py", TRAIN + ["--wandb-run-name", "x"], check=False)
    assert out.returncode == 2 and "--wandb-dir and --wandb-run-name need --wandb-project" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_steps_after_the_last_log_line_are_logged(demo_corpus: Path, tmp_path: Path) -> None:
    """--train-iters not a multiple of --log-interval: the last steps get their line, and the
    summary's train loss is theirs (it said "train n/a" when the run was shorter than one interval)."""
    out = run_script("pretrain_gpt2.py", TRAIN + ["--log-interval", "4", "--save", str(tmp_path / "ckpt"),
                                                  "--save-interval", "1", "--eval-interval", "1", "--no-tensorboard"],
                     check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = losses(out.stdout)
    assert sorted(logged) == [4, 6], out.stdout[-3000:]
    assert f"   final lm loss: train {float(logged[6]):.4f} |" in out.stdout


def test_a_train_loss_from_before_skipped_steps_says_so(demo_corpus: Path, tmp_path: Path) -> None:
    """The last interval's steps were all skipped (a non-finite loss): the summary showed the
    interval before's loss as the final one without a word."""
    out = run_script("pretrain_gpt2.py", TRAIN + ["--no-tensorboard"], check=False,
                     env=dict(ENV, MEGATRON_TEST_INJECT_NAN="5,6"))
    assert out.returncode == 0, out.stderr[-3000:]
    logged = losses(out.stdout)
    assert f"   final lm loss: train {float(logged[4]):.4f} (from the log line at iteration 4: every later step was " \
        "skipped) |" in out.stdout, out.stdout[-3000:]


@pytest.mark.parametrize("nan, expected", [
    ("4-", "(from the log line at iteration 4, whose interval skipped 1 step(s): every later step was skipped)"),
    ("6", "(the last log interval skipped 1 step(s): the mean of its other steps)"),
])
def test_a_train_loss_over_fewer_steps_says_so(nan: str, expected: str, demo_corpus: Path) -> None:
    """Found by the hostile review: with skipped steps inside the loss's own interval, the summary
    named that interval's iteration as if it had been applied, or said nothing."""
    out = run_script("pretrain_gpt2.py", TRAIN + ["--no-tensorboard"], check=False,
                     env=dict(ENV, MEGATRON_TEST_INJECT_NAN=nan))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final lm loss: train " in out.stdout and f" {expected} |" in out.stdout, out.stdout[-3000:]


def test_an_early_stop_logs_its_last_steps_before_it_says_so(demo_corpus: Path, tmp_path: Path) -> None:
    out = run_script("pretrain_gpt2.py", TRAIN + ["--log-interval", "3", "--exit-interval", "5", "--save",
                                                  str(tmp_path / "ckpt"), "--no-tensorboard"], check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(out.stdout)) == [3, 5], out.stdout[-3000:]
    assert out.stdout.index("iteration        5/") < out.stdout.index("exiting at iteration 5"), out.stdout[-3000:]
