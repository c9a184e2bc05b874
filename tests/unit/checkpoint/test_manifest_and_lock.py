"""Checkpoint manifests (every file's SHA-256 in the ``complete`` marker), the choice of the
newest checkpoint that verifies, and the one-writer lock."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from megatron.checkpoint.layout import (
    COMPLETE_MARKER,
    TRACKER_FILENAME,
    candidate_iterations,
    checkpoint_files,
    file_digest,
    manifest_text,
    read_manifest,
)
from megatron.checkpoint.lock import LOCK_FILENAME, DirectoryLock
from megatron.checkpoint.verify import choose_checkpoint, verify_checkpoint
from megatron.errors import ConfigError


def _checkpoint(root: Path, iteration: int, payload: bytes = b"weights", manifest: bool = True) -> Path:
    directory = root / f"iter_{iteration:07d}"
    (directory / "mp_rank_00").mkdir(parents=True)
    (directory / "mp_rank_00" / "model_optim_rng.pt").write_bytes(payload * 1000)
    (directory / "extra.pt").write_bytes(payload)
    if manifest:
        digests = {name: file_digest(str(directory / name)) for name in checkpoint_files(str(directory))}
        (directory / COMPLETE_MARKER).write_text(manifest_text(iteration, digests))
    else:
        (directory / COMPLETE_MARKER).write_text(f"{iteration}\n")
    (root / TRACKER_FILENAME).write_text(f"{iteration}\n")
    return directory


def test_manifest_round_trip_and_verification(tmp_path: Path) -> None:
    directory = _checkpoint(tmp_path, 4)
    manifest = read_manifest(str(directory))
    assert manifest.iteration == 4 and set(manifest.files) == {"mp_rank_00/model_optim_rng.pt", "extra.pt"}
    assert verify_checkpoint(str(directory)).ok
    target = directory / "mp_rank_00" / "model_optim_rng.pt"
    damaged = bytearray(target.read_bytes())
    damaged[100] ^= 0x80  # one sign bit
    target.write_bytes(bytes(damaged))
    assert verify_checkpoint(str(directory)).problems == ["mp_rank_00/model_optim_rng.pt does not match its SHA-256 "
                                                          "(damaged on disk)"]
    target.unlink()
    assert verify_checkpoint(str(directory)).problems == ["mp_rank_00/model_optim_rng.pt is missing"]


def test_newest_verified_checkpoint_is_chosen_out_loud(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    (newest / "extra.pt").write_bytes(b"other!!")  # same size, other bytes
    said: list[str] = []
    iteration, verdict = choose_checkpoint(str(tmp_path), said.append)
    assert iteration == 2 and verdict.ok
    assert len(said) == 1 and "iter_0000004 is damaged: extra.pt does not match its SHA-256" in said[0]
    (tmp_path / "iter_0000002" / "extra.pt").unlink()
    with pytest.raises(ConfigError, match="is corrupt or incomplete"):
        choose_checkpoint(str(tmp_path), said.append)


def test_checkpoints_from_before_manifests_load_unverified(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 3, manifest=False)
    said: list[str] = []
    assert choose_checkpoint(str(tmp_path), said.append)[0] == 3
    assert "written before checkpoints carried checksums" in said[0]


def test_an_unreadable_tracker_falls_back_to_the_newest_complete(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 5)
    (tmp_path / TRACKER_FILENAME).write_bytes(b"\xff\xfe\x00garbage")
    assert candidate_iterations(str(tmp_path))[0] == 5
    assert choose_checkpoint(str(tmp_path), print)[0] == 5


def _hold_lock(directory: str, ready: multiprocessing.Event, release: multiprocessing.Event) -> None:
    lock = DirectoryLock(directory)
    lock.acquire()
    ready.set()
    release.wait(30)
    lock.release()


def _start_holder(directory: Path) -> tuple[multiprocessing.Process, multiprocessing.Event]:
    """Another process holding ``directory``'s writer lock until the returned event is set."""
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(directory), ready, release))
    holder.start()
    assert ready.wait(60)
    return holder, release


def test_one_writer_per_directory(tmp_path: Path) -> None:
    holder, release = _start_holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"is being written by another run \(pid {holder.pid} on "):
            DirectoryLock(str(tmp_path)).acquire()
    finally:
        release.set()
        holder.join(30)
    lock = DirectoryLock(str(tmp_path))
    assert lock.acquire() is None  # released cleanly: nothing to take over
    lock.release()


def test_a_dead_holder_is_taken_over_with_a_note(tmp_path: Path) -> None:
    holder, _ = _start_holder(tmp_path)
    holder.kill()  # dies holding it: the kernel frees the lock, the file still names the holder
    holder.join(30)
    assert str(holder.pid) in (tmp_path / LOCK_FILENAME).read_text()
    lock = DirectoryLock(str(tmp_path))
    note = lock.acquire()
    assert note is not None and f"pid {holder.pid}" in note and "no longer running" in note
    lock.release()
