"""When a DeepSpeed resume needs DeepSpeed's universal checkpoint, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.backends.deepspeed_universal import needs_resharding, saved_topology
from megatron.checkpoint.layout import FileDigest, Topology, manifest_text
from megatron.errors import ConfigError


def _topology(stage: int, dp: int, mp: int = 1, pp: int = 1) -> Topology:
    return Topology("deepspeed", stage, dp, mp, pp)


@pytest.mark.parametrize("saved,current,needed", [
    (_topology(1, 2), _topology(1, 2), False),
    (_topology(1, 2), _topology(2, 2), False),  # ZeRO 1 and 2 partition alike
    (_topology(1, 2), _topology(1, 1), True),
    (_topology(2, 2), _topology(3, 2), True),
    (_topology(3, 4), _topology(3, 2), True),
    (_topology(0, 4), _topology(0, 2), False),  # no partitions: the engine loads it as it is
    (None, _topology(1, 2), False),  # not known: the engine decides (and says what is wrong)
])
def test_when_resharding_is_needed(saved: Topology | None, current: Topology, needed: bool) -> None:
    assert needs_resharding(saved, current, "ckpt/iter_0000004") is needed


@pytest.mark.parametrize("saved,current,fix", [
    (_topology(1, 2, mp=2), _topology(1, 1, mp=2), r"launch at the saved ZeRO stage \(1\) and data-parallel size \(2\)"),
    (_topology(1, 2, mp=2), _topology(1, 2, mp=1), "launch with the saved --model-parallel-size and --pipe-parallel"),
    (_topology(1, 1, pp=2), _topology(1, 2, pp=1), "launch with the saved --model-parallel-size and --pipe-parallel"),
    (_topology(0, 2), _topology(1, 2), "launch at ZeRO stage 0"),
    (_topology(2, 2), _topology(0, 1), "launch at ZeRO stage 1, 2 or 3"),
])
def test_unsupported_changes_are_refused(saved: Topology, current: Topology, fix: str) -> None:
    with pytest.raises(ConfigError, match=f"this run is .*: that change is not supported: .*{fix}"):
        needs_resharding(saved, current, "ckpt/iter_0000004")


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
