"""What a finished training run tells its user (issue 20): Megatron's checkpoint lines, a closing
summary whose next commands work as printed, TensorBoard events and ``loss.png`` in the
experiment directory."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from launchers import ENV, REPO, TINY_GPT2, run_script

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
