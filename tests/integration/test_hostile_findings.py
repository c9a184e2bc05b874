"""Findings of a hostile review of issue 16 ("nothing lost, nothing silent, nobody hangs"), kept
as tests: each reproduces what failed before its fix (a malformed marker was a traceback, a
manifest listing nothing verified nothing, --finetune overwrote its own --load, an unresolvable
MASTER_ADDR waited for the collective timeout, a full disk in the tools was a traceback that left
staging behind). The tmpfs ones need root (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from checkpoint_helpers import convert, random_hf_model
from launchers import DIVISIBLE, ENV, TINY_GPT2, TOKENIZER, assert_one_line_error, run_script


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, verified Megatron checkpoint at iteration 0 (from a random HF model)."""
    root = tmp_path_factory.mktemp("hostile")
    random_hf_model(root / "source")
    convert("from-hf", "--input", str(root / "source"), "--save", str(root / "ckpt"), "--model-parallel-size", "1",
            *DIVISIBLE)
    return root / "ckpt"


def _copy_with_marker(converted: Path, tmp_path: Path, marker: bytes) -> Path:
    load = tmp_path / "ckpt"
    shutil.copytree(converted, load)
    (load / "iter_0000000" / "complete").write_bytes(marker)
    return load


@pytest.mark.parametrize("marker", [
    pytest.param("²\n".encode(), id="unicode-digit"),  # str.isdigit() is True, int() fails
    pytest.param(None, id="iteration-1e400"),  # json gives float inf; int(inf) -> OverflowError
    pytest.param(b"[" * 200000 + b"]" * 200000, id="deeply-nested-json"),  # RecursionError
])
def test_damaged_manifest_is_named_not_a_traceback(converted: Path, tmp_path: Path, marker: bytes | None) -> None:
    if marker is None:
        text = (converted / "iter_0000000" / "complete").read_text()
        marker = text.replace('"iteration": 0', '"iteration": 1e400').encode()
    load = _copy_with_marker(converted, tmp_path, marker)
    result = convert("to-hf", "--load", str(load), "--output", str(tmp_path / "hf"), *TOKENIZER, check=False)
    assert_one_line_error(result, "iter_0000000")


@pytest.mark.parametrize("listed", ["nothing", "outside"])
def test_manifest_must_cover_the_checkpoint_files(converted: Path, tmp_path: Path, listed: str) -> None:
    """A manifest listing no file (or only files outside the checkpoint) left the real files
    unverified: a damaged file loaded without a word."""
    load = tmp_path / "ckpt"
    shutil.copytree(converted, load)
    marker = load / "iter_0000000" / "complete"
    manifest = json.loads(marker.read_text())
    outside = load / "latest_checkpointed_iteration.txt"
    manifest["files"] = {} if listed == "nothing" else {
        "../latest_checkpointed_iteration.txt": {"size": outside.stat().st_size, "sha256": _sha(outside)}}
    marker.write_text(json.dumps(manifest))
    model = load / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10  # silent bit flip in tensor data
    model.write_bytes(bytes(data))
    result = convert("to-hf", "--load", str(load), "--output", str(tmp_path / "hf"), *TOKENIZER, check=False)
    fragment = "is not in the manifest" if listed == "nothing" else "its complete marker is unreadable"
    assert_one_line_error(result, "is corrupt or incomplete")
    assert fragment in result.stderr and not (tmp_path / "hf").exists()


def _tiny(save: Path, *extra: str) -> list[str]:
    return [*TINY_GPT2, "--batch-size", "2", "--train-iters", "4", "--save", str(save), "--save-interval", "4",
            *extra]


def test_finetune_into_its_own_load_directory_does_not_overwrite(tmp_path: Path) -> None:
    """--finetune restarts at iteration 0; with --save == --load it overwrote the run's iter_0000004
    (and pointed the tracker at it) without a word."""
    run = tmp_path / "run"
    run_script("pretrain_gpt2.py", _tiny(run))
    before = {p: _sha(p) for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".writer.lock"}
    result = run_script("pretrain_gpt2.py", _tiny(run, "--load", str(run), "--finetune"), check=False)
    after = {p: _sha(p) for p in before if p.exists()}
    assert after == before, "checkpoints of the earlier run were changed"
    assert_one_line_error(result, "which --finetune (a new run from iteration 0) would overwrite: pass another --save")


def test_world_size_too_large_is_one_line(tmp_path: Path) -> None:
    env = dict(ENV, RANK="0", WORLD_SIZE="99999999999999999999", MASTER_ADDR="127.0.0.1", MASTER_PORT="29651")
    result = run_script("pretrain_gpt2.py", _tiny(tmp_path / "run"), env=env, check=False, timeout=300)
    assert_one_line_error(result, "WORLD_SIZE")


def test_unresolvable_master_addr_does_not_hang(tmp_path: Path) -> None:
    env = dict(ENV, RANK="0", WORLD_SIZE="1", MASTER_ADDR="no.such.host.invalid", MASTER_PORT="29652")
    try:
        result = run_script("pretrain_gpt2.py", _tiny(tmp_path / "run"), env=env, check=False, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("MASTER_ADDR=no.such.host.invalid hangs (until --distributed-timeout-minutes)")
    assert_one_line_error(result, "MASTER_ADDR")


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_kib: int) -> None:
    avail = int(subprocess.run(["df", "-k", "--output=avail", str(mount)], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    with open(mount / "fill", "wb") as handle:
        handle.write(b"\0" * max(avail - leave_kib, 0) * 1024)


def test_full_disk_when_taking_the_lock_is_one_line(small_disk: Path, converted: Path, tmp_path: Path) -> None:
    random_hf_model(tmp_path / "source")
    _fill(small_disk, 0)
    result = convert("from-hf", "--input", str(tmp_path / "source"), "--save", str(small_disk / "out"),
                     "--model-parallel-size", "1", *DIVISIBLE, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and ".writer.lock cannot be written (No space left on device" in errors[0]


def test_convert_on_a_full_disk_removes_its_staging(small_disk: Path, tmp_path: Path) -> None:
    random_hf_model(tmp_path / "source")
    _fill(small_disk, 64)
    out = small_disk / "out"
    result = convert("from-hf", "--input", str(tmp_path / "source"), "--save", str(out), "--model-parallel-size",
                     "1", *DIVISIBLE, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "could not be written" in errors[0] and "nothing was kept" in errors[0]
    assert not list(out.glob("iter_*")), list(out.glob("iter_*"))
