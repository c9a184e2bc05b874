"""Checkpoint files and directories, for the Megatron and the DeepSpeed path alike.

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/complete                              (the manifest, written last)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt         (Megatron path)
    <save>/iter_0000100/mp_rank_00_model_states.pt, zero_*    (DeepSpeed path)

The ``complete`` marker is a JSON manifest: the iteration and, for every file of the checkpoint,
its size and SHA-256. A checkpoint whose files do not match it is damaged and never loaded.
Markers written before manifests existed hold only the iteration (``"100\n"``); such a
checkpoint loads without verification. Names, the tracker, the manifest, durable writes (fsync,
atomic rename) and the model description every checkpoint carries live here. No process group
is needed: the offline tools use it as the training run does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron import progress
from megatron.errors import ConfigError

if TYPE_CHECKING:
    from megatron.config import RunConfig

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "complete"
CHECKPOINT_VERSION = 1
MANIFEST_FORMAT = 2  # 1: the marker held the iteration only
HASH_CHUNK_BYTES = 8 * 2**20
MAX_MARKER_BYTES = 64 * 2**20  # a manifest lists a few hundred files at most
MODEL_CONFIG_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                     "padded_vocab_size", "model_parallel_size", "pipe_parallel_size")
TOKENIZER_KEYS = ("vocab_size", "eod_token", "tokenizer_sha256")
# validate(client_state) raises ConfigError when a checkpoint does not belong to this run.
StateCheck = Callable[[dict[str, Any]], None]


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def megatron_checkpoint_name(root: str, tag: str, mp_rank: int) -> str:
    return os.path.join(root, tag, f"mp_rank_{mp_rank:02d}", "model_optim_rng.pt")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
            progress.report()
        fsync_path(dirpath)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def save_torch_file(state: Any, path: str, zipfile: bool = True) -> None:
    """``torch.save`` ``state`` to ``path`` (``zipfile``: the default format; False: the legacy one
    DeepSpeed may be configured to write), flushed to disk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(state, handle, _use_new_zipfile_serialization=zipfile)
        handle.flush()
        os.fsync(handle.fileno())


def read_megatron_file(path: str) -> dict[str, Any]:
    """``torch.load`` a Megatron-format file safely; a damaged file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file {path} is missing: was it saved with another "
                          "--model-parallel-size, or with --deepspeed?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ConfigError(f"checkpoint file {path} cannot be read ({type(error).__name__}: {error}); "
                          "it is corrupt: load an earlier iteration") from None


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class Topology:
    """How a run laid out its checkpoint files: the training path that wrote them (a backend's
    ``name``) and the ZeRO stage and parallel sizes. Every manifest records it; a resume at
    another topology reads it."""

    path: str
    zero_stage: int
    data_parallel_size: int
    model_parallel_size: int
    pipe_parallel_size: int

    @classmethod
    def of(cls, run: RunConfig, path: str) -> Topology:
        parallel = run.parallel
        return cls(path, run.deepspeed.zero_stage if run.deepspeed.enabled else 0, parallel.data_parallel_size,
                   parallel.model_parallel_size, parallel.pipe_parallel_size)

    @classmethod
    def from_record(cls, record: Any) -> Topology | None:
        """The topology a manifest recorded; None when absent or malformed."""
        try:
            return cls(str(record["path"]), *(int(record[key]) for key in (
                "zero_stage", "data_parallel_size", "model_parallel_size", "pipe_parallel_size")))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None

    def describe(self) -> str:
        return (f"ZeRO stage {self.zero_stage}, data parallel {self.data_parallel_size}, model parallel "
                f"{self.model_parallel_size}, pipeline {self.pipe_parallel_size}")


@dataclass(frozen=True)
class Manifest:
    """What a ``complete`` marker says: the iteration and each file's digest (None: a marker
    from before manifests, nothing to verify against)."""

    iteration: int
    files: dict[str, FileDigest] | None
    topology: Topology | None = None  # how the run that wrote it was laid out


def file_digest(path: str) -> FileDigest:
    """Size and SHA-256 of the file at ``path`` (read in chunks)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            progress.report()
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


def checkpoint_files(directory: str) -> list[str]:
    """The files of a checkpoint directory, relative and sorted (the marker excluded)."""
    found = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            relative = os.path.relpath(os.path.join(dirpath, name), directory)
            if relative != COMPLETE_MARKER:
                found.append(relative)
    return sorted(found)


def manifest_text(iteration: int, files: dict[str, FileDigest], topology: Topology | None = None) -> str:
    """The ``complete`` marker: iteration, every file's size and SHA-256 and, when given, the
    topology that wrote it."""
    entries = {name: {"size": d.size, "sha256": d.sha256} for name, d in sorted(files.items())}
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "iteration": iteration, "files": entries}
    if topology is not None:
        manifest["topology"] = dataclasses.asdict(topology)
    return json.dumps(manifest, indent=1) + "\n"


def is_decimal(text: str) -> bool:
    """``text`` is a non-empty run of ASCII digits (``str.isdigit`` also accepts e.g. "²", which
    ``int`` rejects)."""
    return text.isascii() and text.isdigit()


def _is_inside(name: str) -> bool:
    """``name`` is a plain relative path that stays inside the checkpoint directory."""
    return bool(name) and not os.path.isabs(name) and os.path.normpath(name) == name and \
        not name.startswith("..") and ".." not in name.split(os.sep)


def _parse_manifest(text: str) -> Manifest:
    """The manifest in a marker's ``text``; ValueError (or another parsing error) if malformed."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("iteration"), int) or \
            not isinstance(data.get("files"), dict):
        raise ValueError("not a manifest object")
    files = {}
    for name, entry in data["files"].items():
        size, sha256 = entry.get("size"), entry.get("sha256")
        if not _is_inside(name) or not isinstance(size, int) or size < 0 or not isinstance(sha256, str):
            raise ValueError(f"bad entry {name!r}")
        files[name] = FileDigest(size, sha256)
    return Manifest(data["iteration"], files, Topology.from_record(data.get("topology")))


def read_manifest(directory: str) -> Manifest | None:
    """The manifest of ``directory``'s ``complete`` marker; None when there is no readable marker
    (missing, not UTF-8, malformed, or naming a file outside the checkpoint)."""
    try:
        with open(os.path.join(directory, COMPLETE_MARKER), "rb") as handle:
            text = handle.read(MAX_MARKER_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        if is_decimal(text.strip()):
            return Manifest(int(text), None)
        return _parse_manifest(text)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


def unlisted_files(directory: str, manifest: Manifest) -> list[str]:
    """Problems for files of ``directory`` that its manifest does not list (a checkpoint's
    manifest lists every file it was written with)."""
    listed = manifest.files or {}
    return [f"{name} is not in the manifest" for name in checkpoint_files(directory) if name not in listed]


def verify_files(directory: str, manifest: Manifest, names: list[str]) -> list[str]:
    """Problems with ``names`` (entries of ``manifest``) in ``directory``: missing, wrong size or
    wrong SHA-256; empty when they all match."""
    problems = []
    for name in names:
        expected = manifest.files[name]
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        size = os.path.getsize(path)
        if size != expected.size:
            problems.append(f"{name} has {size} bytes, the manifest says {expected.size}")
        elif file_digest(path).sha256 != expected.sha256:
            problems.append(f"{name} does not match its SHA-256 (damaged on disk)")
    return problems


def write_failure(error: BaseException, directory: str) -> str | None:
    """What went wrong writing a checkpoint into ``directory`` (with the space left there), or
    None if ``error`` is not a failed write."""
    if isinstance(error, OSError):
        reason = os.strerror(error.errno) if error.errno else str(error)
    elif isinstance(error, RuntimeError) and any(mark in str(error) for mark in (
            "No space left", "unexpected pos", "PytorchStreamWriter", "file write failed", "write failed")):
        reason = f"a file could not be written, most likely no space left ({str(error).splitlines()[0][:160]})"
    else:
        return None
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.0f} MB free there"
    except OSError:
        free = "free space unknown"
    return f"{reason} ({free})"


def is_complete(load_dir: str, iteration: int) -> bool:
    return os.path.isfile(os.path.join(load_dir, checkpoint_tag(iteration), COMPLETE_MARKER))


def complete_iterations(load_dir: str) -> list[int]:
    """Iterations with a complete checkpoint under ``load_dir``, oldest first."""
    found = []
    for name in os.listdir(load_dir) if os.path.isdir(load_dir) else []:
        if name.startswith("iter_") and is_decimal(name[5:]) and is_complete(load_dir, int(name[5:])):
            found.append(int(name[5:]))
    return sorted(found)


def read_tracker(load_dir: str) -> int | None:
    """The iteration ``latest_checkpointed_iteration.txt`` names; None if absent or unreadable."""
    try:
        with open(os.path.join(load_dir, TRACKER_FILENAME), "rb") as handle:
            text = handle.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if is_decimal(text) and len(text) < 20 else None


def tracker_problem(load_dir: str) -> str | None:
    """Why the tracker of ``load_dir`` cannot be followed (unreadable, or naming an iteration
    that is not complete), or None when it can or is absent (loaders then take the newest
    complete checkpoint)."""
    path = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.lexists(path):
        return None
    tracked = read_tracker(load_dir)
    if tracked is None:
        return f"{path} does not hold an iteration number"
    if not is_complete(load_dir, tracked):
        return f"{path} names iteration {tracked}, which has no complete checkpoint"
    return None


def candidate_iterations(load_dir: str) -> list[int]:
    """Complete iterations to try, in order: the tracker's (if complete), then the others newest
    first. A loader takes the first that verifies."""
    iterations = sorted(complete_iterations(load_dir), reverse=True)
    tracked = read_tracker(load_dir)
    if tracked in iterations:
        iterations.remove(tracked)
        iterations.insert(0, tracked)
    return iterations


def check_model_config(saved: dict[str, Any], expected: dict[str, Any], where: str,
                       override_tokenizer: bool = False) -> None:
    """A checkpoint's ``model_config`` against the run's; a difference is a ConfigError.

    The shape (``MODEL_CONFIG_KEYS``) must match. The tokenizer identity (``TOKENIZER_KEYS``:
    true vocabulary size, end-of-document id, fingerprint of the tokenizer files) must match
    unless ``override_tokenizer`` (``--override-tokenizer-check``); checkpoints written before it
    was recorded are not checked for it.
    """
    saved = {"pipe_parallel_size": 1, **saved}  # checkpoints from before pipelining existed
    diffs = [f"{key}: checkpoint {saved.get(key)} vs run {value}" for key, value in expected.items()
             if key in MODEL_CONFIG_KEYS and saved.get(key) != value]
    if diffs:
        hint = (" (reshard it with tools/convert_checkpoint.py reshard)"
                if any(d.startswith("model_parallel_size") for d in diffs) else "")
        raise ConfigError(f"checkpoint {where} does not match this model: {'; '.join(diffs)}{hint}")
    check_tokenizer(saved, expected, where, override_tokenizer)


def check_tokenizer(saved: dict[str, Any], given: dict[str, Any], where: str, override: bool = False) -> None:
    """ConfigError unless the tokenizer identity ``given`` (``TOKENIZER_KEYS``) is the one the
    checkpoint recorded in ``saved`` (keys missing on either side are not compared), or ``override``."""
    diffs = [f"{key}: checkpoint {saved[key]} vs given {given[key]}" for key in TOKENIZER_KEYS
             if key in saved and key in given and saved[key] != given[key]]
    if diffs and not override:
        raise ConfigError(f"checkpoint {where} was trained with another tokenizer ({'; '.join(diffs)}): "
                          "pass the --vocab-file/--merge-file it was trained with (or --override-tokenizer-check "
                          "for a deliberate vocabulary change)")
