"""megatron/host_memory: on a CPU run freed host memory stays in the process, so a step that frees
and allocates the same large tensors again takes no new page faults; the user's own allocator
settings are left alone. Each case runs in a fresh interpreter (the setting is process-wide)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from megatron.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[2] == "keep" else None
faults = []
for _ in range(10):  # a 'step': 96 MB of fresh tensors, written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(12 * 1024 * 1024) for _ in range(2)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _probe(mode: str, **env: str) -> dict:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    environment.pop("GLIBC_TUNABLES", None)
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO), mode], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert min(default["faults"][-2:]) > 20_000  # blocks over 32 MB: always mmapped, faulted each time
    # kept: the heap grows for the first steps (a freed block is reused once it has coalesced with
    # its neighbours: torch asks for aligned blocks, a little larger), then serves every step from
    # memory already touched
    assert kept["kept"] is True and max(kept["faults"][-2:]) < 1_000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1000000"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=5"},
                                 {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}])
def test_the_users_allocator_settings_are_left_alone(env: dict[str, str]) -> None:
    assert _probe("keep", **env)["kept"] is False
