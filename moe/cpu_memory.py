"""CPU training: keep freed memory in the process instead of returning it to the OS.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, growing up to 32 MiB)
with a fresh mmap and unmaps it on free. A CPU training step of an MoE layer frees and
reallocates hundreds of MiB of expert-weight gradients and activations, so every step
page-faults them in again: ~200k faults per step of the standard layer of
benchmarks/moe_layer.py, whose step went from 1.22x to 1.12x the GEMM floor once glibc kept the
memory. keep_freed_memory() does that in-process, like starting with
`MALLOC_MMAP_THRESHOLD_=... MALLOC_TRIM_THRESHOLD_=... python train.py`.

Without it, the C++ ops (backend "cpp") still reuse their own large outputs from one step to the
next through a bounded buffer pool (csrc/buffer_pool.cpp; buffer_pool_stats, set_buffer_pool_limit),
so the page faults left are those of tensors torch allocates (optimizer temporaries, autograd's
sums of gradients).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "keep_freed_memory",
    "BufferPoolStats",
    "buffer_pool_stats",
    "set_buffer_pool_limit",
    "pooled_empty",
    "pooled_cat",
]


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


@dataclass(frozen=True)
class BufferPoolStats:
    """Counters of the buffer pool the C++ CPU ops take their large outputs (>= 1 MiB) from.

    fresh: buffers allocated from the system; reused: outputs served by a freed buffer.
    live_bytes / free_bytes: bytes in tensors now / kept free for reuse.
    high_water_bytes: most live bytes at once; limit: the cap on live + free bytes (-1 = default,
    twice high_water_bytes).
    """

    fresh: int
    reused: int
    live_bytes: int
    free_bytes: int
    high_water_bytes: int
    limit: int


def buffer_pool_stats() -> BufferPoolStats | None:
    """The pool's counters (csrc/buffer_pool.cpp), or None when the C++ extension is not built."""
    if not _cpp_loaded():
        return None
    return BufferPoolStats(*torch.ops.moe.buffer_pool_stats())


def set_buffer_pool_limit(limit_bytes: int | None) -> None:
    """Caps the pool's live + free bytes: None = the default (twice the most live at once),
    0 = keep no freed buffer (each output is allocated from the system, as without the pool).

    Raises ValueError for a negative limit; nothing to do without the C++ extension."""
    if limit_bytes is not None and (not isinstance(limit_bytes, int) or limit_bytes < 0):
        raise ValueError(f"limit_bytes must be None or an int >= 0, got {limit_bytes!r}")
    if _cpp_loaded():
        torch.ops.moe.set_buffer_pool_limit(-1 if limit_bytes is None else limit_bytes)


def pooled_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` with like's dtype and device; on CPU (with the C++
    extension built) from the ops' buffer pool, so a buffer allocated every step is reused."""
    if like.device.type == "cpu" and _cpp_loaded():
        return torch.ops.moe.empty_pooled(list(shape), like.dtype)
    return like.new_empty(shape)


class _PooledCat(torch.autograd.Function):
    """torch.cat along rows into a pooled buffer; the backward hands out row slices of the gradient."""

    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = [p.shape[0] for p in parts]
        out = pooled_empty((sum(ctx.rows), *parts[0].shape[1:]), parts[0])
        return torch.cat(parts, out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.split(ctx.rows)


def pooled_cat(parts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torch.cat(parts) along dim 0, differentiable, into a pooled_empty buffer: a cat of the same
    size every step (the pipelined expert-parallel combine, the 2D all-to-all) reuses its memory
    instead of page-faulting a fresh one in."""
    if not parts:
        raise ValueError("pooled_cat needs at least one tensor")
    return parts[0] if len(parts) == 1 else _PooledCat.apply(*parts)


def _cpp_loaded() -> bool:
    from moe.ops import cpp  # here, not at import: loading the extension is deferred (see moe.ops.cpp)

    return cpp.loaded()
