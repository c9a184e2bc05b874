"""Saving and loading a training run's checkpoint: the directory protocol and the state both
paths add (progress, RNG, model and tokenizer description). Every rank calls ``save_checkpoint``
and ``load_checkpoint``; the backend writes and reads its own files.

A run first opens its ``--save`` directory (``open_save_directory``): rank 0 takes the writer
lock, refuses a directory holding another run's checkpoints, and removes staging left by a killed
save. A checkpoint is written under ``iter_0000100.tmp``; once every rank has flushed its files,
the ranks hash them together and rank 0 writes the manifest (``complete``) into the staging
directory, renames it to ``iter_0000100``, and only then names it in the tracker file. A
directory without its manifest is never loaded, and loading checks every file against it: a
damaged checkpoint is skipped for the previous one that verifies, out loud. A failed write (a
full disk) removes the staging directory and stops the run with one line; the previous
checkpoints are untouched. Nothing here writes to ``--load`` unless it is also ``--save``.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron import mpu
from megatron.checkpoint.async_save import BackgroundSaver, Snapshots
from megatron.checkpoint.layout import (
    CHECKPOINT_VERSION,
    COMPLETE_MARKER,
    TRACKER_FILENAME,
    Topology,
    check_model_config,
    checkpoint_files,
    checkpoint_tag,
    complete_iterations,
    fsync_path,
    fsync_tree,
    manifest_text,
    write_failure,
    write_text_atomic,
)
from megatron.checkpoint.lock import DirectoryLock
from megatron.checkpoint.rng import get_rng_states
from megatron.checkpoint.verify import choose_checkpoint, digest_files
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted
from megatron.launch import ensure_launcher_alive

if TYPE_CHECKING:
    from megatron.backends.base import Backend


def run_model_config(run: RunConfig) -> dict[str, Any]:
    """What a checkpoint's tensors and token ids depend on; a mismatch at load time is a user error."""
    identity: dict[str, Any] = {"vocab_size": run.model.vocab_size, "eod_token": run.eod_token}
    if run.tokenizer_sha256:
        identity["tokenizer_sha256"] = run.tokenizer_sha256
    return {**run.model.shape(), "model_parallel_size": run.parallel.model_parallel_size,
            "pipe_parallel_size": run.parallel.pipe_parallel_size, **identity}


def client_state(run: RunConfig, backend: Backend, iteration: int, consumed_samples: int) -> dict[str, Any]:
    """The state both paths add to a checkpoint: progress, RNG, model and tokenizer description."""
    state: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "model_config": run_model_config(run),
    }
    if run.checkpoint.save_rng:
        state["rng_states"] = get_rng_states(backend.rng_tracker)
    return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group: ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _all_ok(ok: bool, group: ProcessGroup | None = None) -> bool:
    """Whether ``ok`` holds on every rank (of ``group``: a gloo group, so on the CPU)."""
    flag = torch.tensor([0.0 if ok else 1.0], device="cpu" if group is not None else mpu.communication_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() == 0.0


def _say(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of ``params`` is finite. A NaN or Inf element makes its tensor's sum
    NaN or Inf, so finite sums prove it with one reduction each and no elementwise mask (14x
    faster on CPU: the check runs on the training thread at every save); only a non-finite sum,
    which huge finite weights can also give by overflow, is checked element by element, as are
    tensors that are not real floating point (a complex sum in fp32 would drop the imaginary part)."""
    params = [param.detach() for param in params if param.numel()]
    summed = [param for param in params if param.is_floating_point()]  # complex, integer: elementwise
    others = [param for param in params if not param.is_floating_point()]
    if summed and not bool(torch.isfinite(torch.stack([param.sum(dtype=torch.float32) for param in summed])).all()):
        others = summed + others
    return all(bool(torch.isfinite(param).all()) for param in others)


def check_weights_finite(backend: Backend, iteration: int) -> None:
    """Refuse to save NaN/Inf weights (agreed across ranks): good checkpoints stay the newest."""
    bad = torch.zeros(1, device=mpu.communication_device())
    if not weights_finite(list(backend.parameters())):
        bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        raise TrainingAborted(f"weights are not finite at iteration {iteration}: checkpoint not written; "
                              "resume from the last complete checkpoint with a lower --lr")


def remove_stale_staging(save: str) -> None:
    """Delete ``iter_*.tmp`` directories left by a killed save, and ``.reshard-*`` copies left by
    a killed resharding load (only under the writer lock)."""
    for name in os.listdir(save) if os.path.isdir(save) else []:
        if (name.startswith("iter_") and name.endswith(".tmp")) or name.startswith(".reshard-"):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)


def apply_retention(save: str, keep_last_n: int | None) -> None:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (never the newest)."""
    if not keep_last_n:
        return
    complete = complete_iterations(save)
    for iteration in complete[: max(len(complete) - keep_last_n, 0)]:
        shutil.rmtree(os.path.join(save, checkpoint_tag(iteration)), ignore_errors=True)


def _same_directory(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_not_another_run(save: str, load: str | None, finetune: bool = False) -> None:
    """A ``--save`` holding checkpoints belongs to the run that wrote them: only that run,
    resumed with ``--load`` on the same directory, may write there (a ``--finetune`` run starts
    a new run at iteration 0, so it may not)."""
    existing = complete_iterations(save)
    if not existing:
        return
    held = f"--save {save} already holds checkpoints of a run (iterations {existing[0]} to {existing[-1]})"
    if finetune:
        raise ConfigError(f"{held}, which --finetune (a new run from iteration 0) would overwrite: pass "
                          "another --save for the fine-tuned run")
    if not _same_directory(save, load):
        raise ConfigError(f"{held} and this run does not resume it: pass --load {save} to continue that "
                          "run, or pick an empty directory for a new one")


def _open_as_rank_0(run: RunConfig) -> tuple[DirectoryLock | None, str | None, str | None]:
    """(lock, note, error) of rank 0's attempt to open ``--save``."""
    save = run.checkpoint.save
    lock = DirectoryLock(save)
    try:
        note = lock.acquire("--save")
        check_not_another_run(save, run.checkpoint.load, run.checkpoint.finetune)
    except ConfigError as error:
        lock.release()
        return None, None, str(error)
    remove_stale_staging(save)
    return lock, note, None


def open_save_directory(run: RunConfig) -> DirectoryLock | None:
    """Rank 0 takes the writer lock of ``--save`` for the run's life and cleans staging left by a
    killed save; every rank learns the outcome, so a refusal stops them all with the reason."""
    if not run.checkpoint.save:
        return None
    lock, note, error = _open_as_rank_0(run) if _rank() == 0 else (None, None, None)
    box = [note, error]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        _say(f" note: {box[0]}")
    if box[1]:
        raise ConfigError(box[1])
    return lock


def _write_staging(run: RunConfig, backend: Backend, staging_tag: str, state: dict[str, Any],
                   sink: Snapshots | None = None) -> str | None:
    """This rank's files of the checkpoint, flushed to disk (or, with ``sink``, copied to host
    memory for the background to write); the failure if the write failed."""
    staging_dir = os.path.join(run.checkpoint.save, staging_tag)
    try:
        backend.save_state(run.checkpoint.save, staging_tag, state, sink)
        if sink is None and os.path.isdir(staging_dir):
            fsync_tree(staging_dir)
    except (OSError, RuntimeError) as error:
        return _failure(error, run.checkpoint.save)
    return None


def _make_staging(save: str, staging_dir: str) -> str | None:
    """Rank 0: an empty staging directory; the failure if it cannot be made (``--save`` became
    read-only, lost its permissions or is full)."""
    try:
        shutil.rmtree(staging_dir, ignore_errors=True)
        os.makedirs(staging_dir)
    except OSError as error:
        return _failure(error, save)
    return None


def _write_snapshots(save: str, staging_dir: str, snapshots: Snapshots) -> str | None:
    """Write and flush the files ``snapshots`` kept (in the background); the failure if one failed."""
    try:
        snapshots.write_all()
        if os.path.isdir(staging_dir):
            fsync_tree(staging_dir)
    except (OSError, RuntimeError) as error:
        return _failure(error, save)
    finally:
        snapshots.files.clear()  # the host copy is not needed after a failure either
    return None


def _failure(error: OSError | RuntimeError, save: str) -> str:
    """The one-line reason of a failed checkpoint write (an error that is not one is re-raised)."""
    failure = write_failure(error, save)
    if failure is None:
        raise error
    return failure


def _keep_aside(final_dir: str) -> None:
    """Rename an existing ``iter_*`` out of the way, never deleting it: the run resumed from an
    earlier checkpoint (this one did not verify, or the tracker did not name it yet: a kill
    between the rename and the tracker) and has now reached its iteration again."""
    aside = f"{final_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(final_dir, aside)
    _say(f" note: {final_dir} already existed from an earlier attempt that this run did not resume from (it did "
         f"not verify, or {TRACKER_FILENAME} did not name it yet); it was kept as {aside} and the new checkpoint "
         "written in its place: delete the old one when you no longer need it")


def _finish_as_rank_0(save: str, staging_dir: str, final_dir: str, iteration: int, manifest: str,
                      writes_latest: bool) -> str | None:
    """Manifest into staging, rename into place, tracker; the failure if a write failed."""
    try:
        write_text_atomic(os.path.join(staging_dir, COMPLETE_MARKER), manifest)
        if os.path.lexists(final_dir):
            _keep_aside(final_dir)
        os.replace(staging_dir, final_dir)
        fsync_path(save)
        write_text_atomic(os.path.join(save, TRACKER_FILENAME), f"{iteration}\n")
        if writes_latest:
            write_text_atomic(os.path.join(save, "latest"), os.path.basename(final_dir))
        elif os.path.isfile(os.path.join(save, "latest")):
            # DeepSpeed's tools (zero_to_fp32.py) follow ``latest``: after a Megatron-path checkpoint
            # it would name an older DeepSpeed one as the newest.
            os.remove(os.path.join(save, "latest"))
            _say(f" note: removed {os.path.join(save, 'latest')} (DeepSpeed's pointer to its newest checkpoint): "
                 f"{os.path.basename(final_dir)} is a Megatron-path checkpoint")
    except OSError as error:
        return write_failure(error, save)
    return None


def _first_failure(failure: str | None, group: ProcessGroup | None = None) -> str | None:
    """The failure of the lowest rank that had one, on every rank: whichever rank's line the user
    sees first (the launcher stops the others once one exits), it names the cause."""
    if not dist.is_initialized():
        return failure
    failures: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(failures, failure, group=group)
    return next((f"{reason} (on rank {rank})" if rank != dist.get_rank(group) else reason
                 for rank, reason in enumerate(failures) if reason), None)


def _abort_save(save: str, staging_dir: str, iteration: int, failure: str | None,
                group: ProcessGroup | None = None) -> None:
    """Remove the partial checkpoint and stop the run; the previous checkpoints are untouched."""
    if _rank() == 0:
        shutil.rmtree(staging_dir, ignore_errors=True)
    failure = _first_failure(failure, group)  # also the barrier: the staging directory is gone
    newest = complete_iterations(save)
    previous = (f"the newest complete checkpoint, {checkpoint_tag(newest[-1])}, is intact" if newest
                else "no earlier checkpoint exists")
    raise TrainingAborted(f"checkpoint {checkpoint_tag(iteration)} could not be written to {save}: "
                          f"{failure or 'another rank failed to write its files'}; the partial checkpoint was "
                          f"removed and {previous}: free space (or fix the directory) and relaunch to resume")


def save_checkpoint(run: RunConfig, backend: Backend, iteration: int, consumed_samples: int,
                    saver: BackgroundSaver | None = None) -> str:
    """Write checkpoint ``iteration`` under ``--save``; every rank calls it. Returns its directory.

    With ``saver`` (``--async-save``) this returns once the state is copied to host memory, and
    the checkpoint is completed in the background (after the previous one, waited for first).
    """
    ensure_launcher_alive()  # a worker whose launcher died must not start a checkpoint
    if saver is not None:
        saver.wait()  # one checkpoint in flight at a time; a failed one stops the run here
    save = run.checkpoint.save
    check_weights_finite(backend, iteration)
    _say(f"saving checkpoint at iteration {iteration:7d} to {save}" + (" (in the background)" if saver else ""))
    tag = checkpoint_tag(iteration)
    staging_tag, final_dir = tag + ".tmp", os.path.join(save, tag)
    staging_dir = os.path.join(save, staging_tag)
    made = _make_staging(save, staging_dir) if _rank() == 0 else None
    if not _all_ok(made is None):  # also the barrier: the staging directory exists for every rank
        _abort_save(save, staging_dir, iteration, made)
    state = client_state(run, backend, iteration, consumed_samples)
    topology = Topology.of(run, backend.name)
    if saver is None:
        failure = _write_staging(run, backend, staging_tag, state)
        _complete(run, staging_dir, iteration, failure, topology, backend.writes_deepspeed_latest)
        return final_dir
    snapshots = Snapshots(saver.pool)
    failure = _write_staging(run, backend, staging_tag, state, snapshots)

    def complete_in_background() -> None:
        written = failure or _write_snapshots(save, staging_dir, snapshots)
        _complete(run, staging_dir, iteration, written, topology, backend.writes_deepspeed_latest, saver.group)

    saver.start(complete_in_background, tag)
    return final_dir


def _complete(run: RunConfig, staging_dir: str, iteration: int, failure: str | None, topology: Topology,
              writes_latest: bool, group: ProcessGroup | None = None) -> None:
    """Once every rank has written its files (``failure`` if this rank could not): hash them
    together; rank 0 writes the manifest, renames the staging directory into place and names it
    in the tracker; old checkpoints past ``--keep-last-n`` go. Collectives on ``group``."""
    save = run.checkpoint.save
    final_dir = os.path.join(save, checkpoint_tag(iteration))
    if not _all_ok(failure is None, group):
        _abort_save(save, staging_dir, iteration, failure, group)
    names = [checkpoint_files(staging_dir) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0, group=group)
    manifest = manifest_text(iteration, digest_files(staging_dir, names[0], group), topology)
    failure = None
    if _rank() == 0:
        failure = _finish_as_rank_0(save, staging_dir, final_dir, iteration, manifest, writes_latest)
    if not _all_ok(failure is None, group):
        _abort_save(save, staging_dir, iteration, failure, group)
    if _rank() == 0:
        apply_retention(save, run.checkpoint.keep_last_n)
    _barrier(group)
    _say(f"  successfully saved checkpoint at iteration {iteration:7d} to {save}")


def check_load_directory(load: str) -> None:
    """``--load`` names a run's directory (holding ``iter_*``), not one checkpoint or a file."""
    if os.path.isfile(load):
        raise ConfigError(f"--load {load} is a file; pass the run's checkpoint directory (the one holding "
                          "iter_* directories and latest_checkpointed_iteration.txt)")
    name = os.path.basename(os.path.normpath(load))
    if name.startswith("iter_") and os.path.isfile(os.path.join(load, COMPLETE_MARKER)):
        raise ConfigError(f"--load {load} is one checkpoint, not a run directory: pass --load "
                          f"{os.path.dirname(os.path.normpath(load)) or '.'} (its newest complete checkpoint "
                          "is loaded)")


def _choose(run: RunConfig) -> int | None:
    """The iteration to load under ``--load`` (verified by every rank), or None to start fresh."""
    load = run.checkpoint.load
    check_load_directory(load)
    chosen = choose_checkpoint(load, _say)
    if chosen is not None:
        return chosen[0]
    if _same_directory(load, run.checkpoint.save):
        _say(f" no complete checkpoint under {load}: starting from scratch")
        return None
    raise ConfigError(f"--load {load} holds no complete checkpoint (no iter_*/{COMPLETE_MARKER}); check the path, "
                      "or drop --load (set it equal to --save to resume automatically when there is one)")


def load_checkpoint(run: RunConfig, backend: Backend) -> tuple[int, int, dict[str, Any] | None]:
    """Load the newest complete checkpoint under ``--load`` whose files verify.

    Returns (iteration, consumed_samples, RNG states). The caller restores the RNG states with
    ``megatron.checkpoint.rng.set_rng_states`` just before the first step, after everything that
    may still draw from the generators during start-up. Returns (0, 0, None) when ``--load`` is
    the run's own (empty) ``--save``.
    """
    iteration = _choose(run)
    if iteration is None:
        return 0, 0, None
    load, tag = run.checkpoint.load, checkpoint_tag(iteration)
    directory = os.path.join(load, tag)
    expected = run_model_config(run)
    override = run.checkpoint.override_tokenizer_check
    state = backend.load_state(
        load, tag, load_optimizer=run.checkpoint.load_optim and not run.checkpoint.finetune,
        validate=lambda saved: check_model_config(saved.get("model_config", {}), expected, directory, override))
    if run.checkpoint.finetune:
        return 0, 0, None
    rng_states = state.get("rng_states") if run.checkpoint.load_rng else None
    _say(f" loaded checkpoint {directory} at iteration {state['iteration']}")
    return int(state["iteration"]), int(state.get("consumed_samples", 0)), rng_states
