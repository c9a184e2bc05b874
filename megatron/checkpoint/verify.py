"""Checksums of a checkpoint's files, computed and verified by every rank together.

Each rank hashes an equal share of the files (file ``i`` on rank ``i mod world``) and the results
are gathered, so writing or checking a checkpoint costs one read of ``1 / world`` of it per rank.
Without a process group (the offline tools) one process does all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron.checkpoint.layout import (
    FileDigest,
    candidate_iterations,
    checkpoint_tag,
    file_digest,
    read_manifest,
    tracker_problem,
    unlisted_files,
    verify_files,
)
from megatron.errors import ConfigError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _share(names: list[str], group: ProcessGroup | None = None) -> list[str]:
    if not _distributed():
        return names
    return names[dist.get_rank(group)::dist.get_world_size(group)]


def _gather(value: object, group: ProcessGroup | None = None) -> list[object]:
    if not _distributed():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def digest_files(directory: str, names: list[str], group: ProcessGroup | None = None) -> dict[str, FileDigest]:
    """Digests of ``names`` (relative to ``directory``); every rank (of ``group``, default all)
    calls it with the same names."""
    mine = {name: file_digest(os.path.join(directory, name)) for name in _share(names, group)}
    digests: dict[str, FileDigest] = {}
    for part in _gather(mine, group):
        digests.update(part)
    return digests


@dataclass(frozen=True)
class Verdict:
    """A checkpoint directory checked against its manifest."""

    directory: str
    verified: bool  # False for a checkpoint written before manifests: nothing to check against
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checkpoint(directory: str) -> Verdict:
    """Check every file of ``directory`` against its manifest (every rank calls it)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return Verdict(directory, False, ["its complete marker is unreadable"])
    if manifest.files is None:
        return Verdict(directory, False, [])
    problems: list[str] = unlisted_files(directory, manifest)
    for part in _gather(verify_files(directory, manifest, _share(sorted(manifest.files)))):
        problems.extend(part)
    return Verdict(directory, True, sorted(problems))


def describe(verdict: Verdict) -> str:
    more = f" (and {len(verdict.problems) - 1} more)" if len(verdict.problems) > 1 else ""
    return f"{verdict.problems[0]}{more}"


def choose_checkpoint(load: str, say: Callable[[str], None],
                      verify: Callable[[str], Verdict] = verify_checkpoint) -> tuple[int, Verdict] | None:
    """The newest complete checkpoint under ``load`` that verifies, with its verdict; None when
    there is no complete checkpoint at all. A damaged one is skipped with a loud ``say`` naming
    the file; if none verifies, ConfigError."""
    tried = []
    problem = tracker_problem(load)
    if problem is not None:
        say(f" WARNING: {problem}; taking the newest complete checkpoint instead")
    for iteration in candidate_iterations(load):
        verdict = verify(os.path.join(load, checkpoint_tag(iteration)))
        if verdict.ok:
            if not verdict.verified:
                say(f" note: {verdict.directory} was written before checkpoints carried checksums: loading it "
                    "unverified")
            return iteration, verdict
        say(f" WARNING: checkpoint {verdict.directory} is damaged: {describe(verdict)}; it is not loaded, "
            "falling back to the previous complete checkpoint")
        tried.append(f"{checkpoint_tag(iteration)}: {describe(verdict)}")
    if tried:
        raise ConfigError(f"every complete checkpoint under {load} is corrupt or incomplete ({'; '.join(tried)}); "
                          "restore the files from a copy, or start a new run in another directory")
    return None

