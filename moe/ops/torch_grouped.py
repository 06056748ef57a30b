"""Backend "torch": grouped_mm on torch's own grouped GEMM (torch._grouped_mm, F.grouped_mm's op).

Shape legend: M rows sorted by expert (rows past counts.sum() are padding), K in, N out, E experts.

torch._grouped_mm takes int32 end offsets and leaves rows past the last offset uninitialised,
in the forward and in dX; we zero them so this backend returns what the reference returns.
It takes fp32/bf16/fp16 with 16-byte aligned strides and pointers; anything else (fp64, odd
widths) runs the reference instead. Its own autograd rejects expanded (stride-0) gradients,
so the op here is a torch.library custom op with its own backward (dX by grouped_mm on w^T,
dW by grouped_mm with offsets along the reduction dim), which also keeps torch.compile from
tracing into it (torch.compile supports torch._grouped_mm in bf16 only).
On CUDA it needs compute capability 8.0+. The index ops have no torch-specific version: under
backend="torch" they run on the fastest other backend, so a layer can be built with it.
"""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import registry
from moe.ops.grouped_mm import register_autograd

__all__ = ["NAME", "available", "grouped_mm"]


NAME = "torch"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(device: torch.device) -> bool:
    """CPU, or CUDA with compute capability 8.0+, in a torch that has torch._grouped_mm."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    # torch checks every non-unit stride, size-1 dims included
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


def _usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._grouped_mm accepts these operands (else the reference runs)."""
    if a.dtype not in _DTYPES or a.dtype != b.dtype or a.numel() == 0 or b.numel() == 0:
        return False
    if a.device.type == "cuda" and a.dtype != torch.bfloat16:
        return False  # CUDA's grouped GEMM is bf16-only
    return _aligned(a) and _aligned(b)


def _offsets(counts_E: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, int]:
    """(int32 end offsets [E], total rows); ValueError if counts need more rows than there are."""
    ends = reference.segment_ends(counts_E, num_rows)  # the checks, in one host read
    return torch.cumsum(counts_E, 0).to(torch.int32), ends[-1] if ends else 0


@torch.library.custom_op("moe_torch::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if not _usable(x, w):
        return reference.grouped_mm(x, w, counts)
    offs, total = _offsets(counts, x.shape[0])
    y = torch._grouped_mm(x, w, offs=offs)
    y[total:] = 0  # padding rows are left uninitialised
    return y


@_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_torch::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    x_t = x.t()  # [K, M]: offsets run along the reduction dim M
    if not _usable(x_t, dy):
        return reference.grouped_mm_wgrad(x, dy, counts)
    offs, _ = _offsets(counts, x.shape[0])
    dw = torch._grouped_mm(x_t, dy, offs=offs)
    return dw.masked_fill_((counts == 0).view(-1, 1, 1), 0)  # experts without rows get exact zeros


@_grouped_mm_wgrad.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


register_autograd(_grouped_mm, _grouped_mm_wgrad)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e] on torch._grouped_mm; padding rows are 0.

    Args:
        x_MK: [M, K] rows sorted by expert.
        w_EKN: [E, K, N].
        counts_E: [E] int64 rows per expert (zeros allowed).

    Returns:
        [M, N] in x's dtype, differentiable in x and w.
    """
    return _grouped_mm(x_MK, w_EKN, counts_E)


registry.register("grouped_mm", NAME, grouped_mm, available)
for _op in registry.OPS:
    if _op != "grouped_mm":
        registry.register_delegate(_op, NAME, available)
