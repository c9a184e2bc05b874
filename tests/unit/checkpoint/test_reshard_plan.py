"""Which way a resume at another topology goes (``megatron.checkpoint.reshard.plan_resume``), what
it refuses, and how a checkpoint's topology is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.checkpoint.layout import FileDigest, Topology, manifest_text
from megatron.checkpoint.reshard import (
    DEEPSPEED_UNIVERSAL,
    NATIVE,
    UNIVERSAL_COPY,
    plan_resume,
    saved_topology,
)
from megatron.errors import ConfigError


def _topology(stage: int, dp: int, mp: int = 1, pp: int = 1, path: str = "deepspeed") -> Topology:
    return Topology(path, stage, dp, mp, pp)


def _megatron(dp: int = 1, mp: int = 1) -> Topology:
    return Topology("megatron", 0, dp, mp, 1)


def _pipeline(dp: int = 1, mp: int = 1, pp: int = 2) -> Topology:
    return Topology("deepspeed-pipeline", 1, dp, mp, pp)


@pytest.mark.parametrize("saved,current,plan", [
    (_topology(1, 2), _topology(1, 2), NATIVE),
    (_topology(1, 2), _topology(2, 2), NATIVE),  # ZeRO 1 and 2 partition alike
    (_topology(1, 2), _topology(1, 1), DEEPSPEED_UNIVERSAL),
    (_topology(2, 2), _topology(3, 2), DEEPSPEED_UNIVERSAL),
    (_topology(3, 4), _topology(3, 2), DEEPSPEED_UNIVERSAL),
    (_topology(0, 4), _topology(0, 2), NATIVE),  # no partitions: the engine loads it as it is
    (None, _topology(1, 2), NATIVE),  # not known: the engine decides (and says what is wrong)
    (_megatron(mp=2), _megatron(dp=2, mp=2), NATIVE),  # the Megatron path's files do not depend on data parallel
    (_megatron(mp=2), _megatron(mp=1), UNIVERSAL_COPY),
    (_megatron(mp=1), _topology(2, 2), UNIVERSAL_COPY),
    (_topology(3, 2), _megatron(), UNIVERSAL_COPY),
    (_topology(1, 2, mp=2), _topology(1, 1, mp=2), UNIVERSAL_COPY),
    (_topology(0, 2), _topology(1, 2), UNIVERSAL_COPY),  # DeepSpeed's converter needs ZeRO partitions; ours does not
    (_pipeline(mp=2), _topology(1, 2), UNIVERSAL_COPY),
    (_pipeline(), _pipeline(), NATIVE),
    (_topology(1, 2), _pipeline(), UNIVERSAL_COPY),
    (_pipeline(pp=2), _pipeline(pp=4), UNIVERSAL_COPY),
])
def test_the_plan(saved: Topology | None, current: Topology, plan: str) -> None:
    assert plan_resume(saved, current, "ckpt/iter_0000004") == plan


@pytest.mark.parametrize("saved,current,fix", [
    (_topology(2, 2), _topology(0, 1), "launch at ZeRO stage 1, 2 or 3, or on the Megatron path"),
    (_megatron(), _topology(0, 1), "launch at ZeRO stage 1, 2 or 3"),
    (_topology(1, 2), Topology("deepspeed-pipeline", 0, 1, 1, 2), "launch at ZeRO stage 1, 2 or 3"),
])
def test_unsupported_targets_are_refused(saved: Topology, current: Topology, fix: str) -> None:
    with pytest.raises(ConfigError, match=f"this run is .*: that change is not supported: .*{fix}"):
        plan_resume(saved, current, "ckpt/iter_0000004")


def test_topology_from_the_manifest_or_the_file_names(tmp_path: Path) -> None:
    directory = tmp_path / "iter_0000004"
    directory.mkdir()
    (directory / "complete").write_text(manifest_text(4, {"a": FileDigest(1, "0" * 64)}, _topology(2, 4)))
    assert saved_topology(str(directory), _topology(1, 1)) == _topology(2, 4)
    (directory / "complete").write_text("4\n")  # written before manifests: from the file names
    for rank in range(3):
        (directory / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_topology(str(directory), _topology(2, 1)) == _topology(2, 3)
    for rank in range(3):
        (directory / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_topology(str(directory), _topology(1, 1)).zero_stage == 3


def test_megatron_topology_from_the_file_names(tmp_path: Path) -> None:
    directory = tmp_path / "iter_0000004"
    for rank in range(2):
        (directory / f"mp_rank_{rank:02d}").mkdir(parents=True)
        (directory / f"mp_rank_{rank:02d}" / "model_optim_rng.pt").write_bytes(b"")
    (directory / "complete").write_text("4\n")
    assert saved_topology(str(directory), _megatron(dp=2)) == _megatron(dp=2, mp=2)
