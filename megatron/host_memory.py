"""Host memory of CPU training runs: freed blocks stay in the process for the next step.

glibc's malloc serves each block over its mmap threshold (128 KiB at first, 32 MiB at most) with
a fresh ``mmap`` and unmaps it on free, and trims the free top of its heap. A training step frees
and allocates the same large tensors every step (activations, gradients, optimizer temporaries),
so on a CPU run every step touches fresh pages again. Measured on a 2-vCPU VM at the GPT-2 124M
shape with ZeRO 1, one training thread:
- about 300,000 page faults per step, 0.45 s of a 3.9 s step in the kernel;
- a background checkpoint writing to the page cache at the same time made those faults slower.

``keep_freed_host_memory`` makes glibc serve every block from its heaps and never trim them.
PyTorch's CPU launcher (``torch.backends.xeon.run_cpu``) gets the same effect by preloading
jemalloc or tcmalloc. After a few steps no step faults (in that run 3.5 s instead of 3.9 s per
step); the process keeps its peak resident memory, and fragmentation raises that peak (ZeRO 1:
3.9 GB against 3.5 GB).

GPU runs keep glibc's defaults: their large tensors are on the device, and host memory freed after
loading a checkpoint should go back to the system.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a 2 GiB threshold still trimmed every step
# Settings the user may have made: left alone.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_chose_allocator() -> bool:
    """Whether the environment already sets glibc's malloc or preloads another allocator."""
    return (any(name in os.environ for name in _USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")))


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (no mmap for large blocks, no trimming). Returns
    whether it did: False with another C library, or when the user's environment already chose."""
    if platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
