"""CPU training: keep freed memory in the process instead of returning it to the OS.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, growing up to 32 MiB)
with a fresh mmap and unmaps it on free. A CPU training step of an MoE layer frees and
reallocates hundreds of MiB of expert-weight gradients and activations, so every step
page-faults them in again: ~200k faults per step of the standard layer of
benchmarks/moe_layer.py, whose step went from 1.22x to 1.12x the GEMM floor once glibc kept the
memory. keep_freed_memory() does that in-process, like starting with
`MALLOC_MMAP_THRESHOLD_=... MALLOC_TRIM_THRESHOLD_=... python train.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings

__all__ = ["keep_freed_memory"]


# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tells glibc malloc to keep freed memory for reuse; process-wide, not undoable.

    Sets M_MMAP_THRESHOLD = 2 GiB (blocks below it come from the heap, not from fresh mmaps)
    and M_TRIM_THRESHOLD = 2 GiB (freed heap is not handed back to the OS). The cost is memory:
    the resident size stays near its peak instead of shrinking after each step, and glibc's
    aligned allocations fragment the heap (peak RSS of a training loop of the standard layer:
    +36% here). Call it once, early; allocations made before keep their mmaps until freed.

    Returns:
        True when applied; False (with a warning) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        warnings.warn(
            f"keep_freed_memory needs glibc (this is {platform.system()} {platform.libc_ver()[0] or 'non-glibc'}); "
            "nothing changed. Use jemalloc or tcmalloc via LD_PRELOAD instead",
            stacklevel=2,
        )
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _INT_MAX) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        warnings.warn("glibc rejected mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); nothing changed", stacklevel=2)
    return ok
