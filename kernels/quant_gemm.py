"""Triton dequantize-GEMM for one quantized expert weight (moe.quant's int8 / int4 formats):
y [M, N] = x [M, K] @ dequantize(w), each [BLOCK_K, BLOCK_N] weight tile dequantized in
registers right after its load, so only the quantized bytes are read from memory.

    int8: q int8 [K, N], scale [1, N]:              w = q * scale
    int4: q uint8 [K / 2, N] (row 2i low nibble, 2i + 1 high), scale, zero [K / G, N]:
                                                    w = (q - zero[k / G]) * scale[k / G]

BLOCK_K = 32 divides every int4 group size (32, 64, 128), so a tile has one scale row.
Runs compiled on CUDA and in Triton's interpreter on CPU (tests). Written and tested under the
interpreter only: moe.quant does not pick it by default until it has run on a GPU.

Shape legend: M rows, K inner dim, N out dim, G int4 group size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .grouped_gemm import _dot_flags
from .jit import Launchable, build, interpreting

BLOCK_K = 32


def _qmm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_ym,
    stride_yn,
    INT4: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        wmask = k_mask[:, None] & col_mask[None, :]
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sg + cols * stride_sn, mask=col_mask, other=0.0).to(tl.float32)
        if INT4:
            packed = tl.load(q_ptr + (ks // 2)[:, None] * stride_qk + cols[None, :] * stride_qn, mask=wmask, other=0)
            q = ((packed >> ((ks % 2) * 4).to(tl.uint8)[:, None]) & 15).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + cols * stride_sn, mask=col_mask, other=0.0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        else:
            q = tl.load(q_ptr + ks[:, None] * stride_qk + cols[None, :] * stride_qn, mask=wmask, other=0)
            w = q.to(tl.float32) * s[None, :]
        if UPCAST:
            a = a.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@functools.cache
def _kernel(interp: bool) -> Launchable:
    return build(_qmm_kernel, interp, [], [], autotune=False)


def quant_matmul(
    x_MK: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """y [M, N] = x_MK @ dequantize(w) in x's dtype (fp32 accumulation); same arguments as the C++
    op moe::quant_matmul (int8: zero None, group_size = K). Not differentiable (inference).

    Raises:
        ValueError: shapes or dtypes that do not form one int8 / int4 weight of x's K.
    """
    M, K = x_MK.shape
    N = data.shape[1]
    int4 = zero is not None
    want = (K // 2, N) if int4 else (K, N)
    groups = K // group_size if group_size > 0 else -1
    if (
        group_size <= 0
        or K % group_size
        or (int4 and group_size % BLOCK_K)
        or tuple(data.shape) != want
        or data.dtype != (torch.uint8 if int4 else torch.int8)
        or tuple(scale.shape) != (groups, N)
        or (int4 and zero is not None and tuple(zero.shape) != (groups, N))
    ):
        raise ValueError(
            f"quant_matmul: x {tuple(x_MK.shape)} with data {data.dtype} {tuple(data.shape)}, scale "
            f"{tuple(scale.shape)}, zero {None if zero is None else tuple(zero.shape)}, group {group_size} "
            f"is not one {'int4' if int4 else 'int8'} weight of K = {K} (data {want}, scale [{groups}, {N}])"
        )
    y = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    if M == 0 or N == 0:
        return y
    interp = interpreting(x_MK.device)
    upcast, precision = _dot_flags(x_MK.dtype, interp)
    upcast = upcast or x_MK.dtype == torch.float32
    block_m = 16 if M <= 16 else 64
    block_n = 64 if interp else 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    z = zero if zero is not None else scale
    _kernel(interp)[grid](
        x_MK, data, scale, z, y, M, N, K, group_size,
        x_MK.stride(0), x_MK.stride(1), data.stride(0), data.stride(1), scale.stride(0), scale.stride(1),
        y.stride(0), y.stride(1),
        INT4=int4, UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y
