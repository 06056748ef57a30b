"""Triton grouped GEMM over variable-size expert segments: forward (with fused gather, SwiGLU
and top-k weighting) and the weight gradient.

Shapes: M rows of the grouped GEMM (sorted by expert), T token rows of a gathered input,
K input features, N output features (H when SwiGLU: the weight then has 2H columns, [:H] gate,
[H:] up), E experts. Row segment of expert e: [offsets[e], offsets[e + 1]), offsets int64.

Tile scheduling (the moe_align_block_size idea, done inside the kernel so that BLOCK_M can be
autotuned): every program loads the E counts as one vector, turns them into per-expert row-tile
counts and their prefix sum, and finds its expert with one vectorised compare. The grid is the
static upper bound cdiv(M, BLOCK_M) + E + 1 row tiles (no host sync); tiles past the experts'
tiles write the zero padding rows [offsets[E], M), the rest exit without doing anything.

This module imports Triton; moe.kernels.ops imports it only when an op runs.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .jit import Launchable, build, interpreting


# Kernels use only Triton builtins plus this combine function (not tl.sum / tl.cdiv / tl.zeros,
# which are themselves @triton.jit functions that only run in the interpreter when
# TRITON_INTERPRET=1 was set before Triton was imported).
@triton.jit
def _add(a, b):
    return a + b


def _gmm_fwd_kernel(
    x_ptr,
    idx_ptr,
    w_ptr,
    y_ptr,
    pre_ptr,
    offsets_ptr,
    scale_ptr,
    M,
    N,
    K,
    E,
    rows_bucket,  # autotune key only: ~rows per expert, bucketed
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    stride_pm,
    stride_pn,
    GATHER: tl.constexpr,
    SCALE: tl.constexpr,
    SWIGLU: tl.constexpr,
    STORE_PRE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0 (a heuristic): no K mask in the main loop
):
    # y[r] = scale[r] * act(x[src(r)] @ w[e(r)]), src(r) = idx[r] if GATHER else r.
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    num_m = (M + BLOCK_M - 1) // BLOCK_M + E + 1
    # Grouped ordering: GROUP_M row tiles share the sweep over the N tiles (L2 reuse of w).
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # Which expert owns row tile pid_m.
    ex = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
    hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.associative_scan(tiles, 0, _add)
    e = tl.reduce((tiles_end <= pid_m).to(tl.int32), 0, _add)
    # Branch-free (both sides of a Triton `if` must agree on types): e == E is a padding tile
    # (zero rows past the experts' rows) or an idle slot (all its rows >= M).
    is_expert = e < E
    sel = ex == e
    total_rows = tl.minimum(tl.load(offsets_ptr + E), M)
    first_tile = tl.where(is_expert, tl.reduce(tl.where(sel, tiles_end - tiles, 0), 0, _add), tl.reduce(tiles, 0, _add))
    seg_start = tl.where(is_expert, tl.reduce(tl.where(sel, lo, 0), 0, _add), total_rows)
    seg_end = tl.where(is_expert, tl.minimum(tl.reduce(tl.where(sel, hi, 0), 0, _add), M), M)
    row_start = seg_start + (pid_m - first_tile) * BLOCK_M
    row_end = seg_end
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if e < E:
        if GATHER:
            src = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src = rows
        x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            # A K mask that cannot bite still costs: with EVEN_K the loads are masked by rows
            # and columns only (with 4-stage 128x256x64 tiles: 576 -> 650 TF/s in an H100 sweep, BENCHMARKS.md).
            if EVEN_K:
                a_mask = row_mask[:, None]
                b_mask = col_mask[None, :]
            else:
                k_mask = ks < K - k0
                a_mask = row_mask[:, None] & k_mask[None, :]
                b_mask = k_mask[:, None] & col_mask[None, :]
            a = tl.load(x_ptrs, mask=a_mask, other=0.0)
            b = tl.load(w_ptrs, mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                b_up = tl.load(w_ptrs + N * stride_wn, mask=b_mask, other=0.0)
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    out_mask = row_mask[:, None] & col_mask[None, :]
    if SWIGLU:
        if STORE_PRE:
            pre_ptrs = pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
            tl.store(pre_ptrs + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        out = acc / (1.0 + tl.exp(-acc)) * acc_up
    else:
        out = acc
    if SCALE:
        s = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        out = out * s[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def _gmm_wgrad_kernel(
    x_ptr,
    idx_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    scale_ptr,
    M,
    N,
    K,
    rows_bucket,  # autotune key only
    stride_xm,
    stride_xk,
    stride_dm,
    stride_dn,
    stride_we,
    stride_wk,
    stride_wn,
    GATHER: tl.constexpr,
    SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dw[e] = x[src(rows of e)]^T @ (scale * dy)[rows of e]; experts with no rows get zeros.
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    num_k = (K + BLOCK_K - 1) // BLOCK_K
    e = pid // (num_n * num_k)
    pid_k = (pid // num_n) % num_k
    pid_n = pid % num_n
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.minimum(tl.load(offsets_ptr + e + 1), M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64)

    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=tl.float32)
    num_iters = (row_end - row_start + BLOCK_M - 1) // BLOCK_M
    for i in range(0, num_iters):
        rows = row_start + i * BLOCK_M + arange_m
        row_mask = rows < row_end
        if GATHER:
            src = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src = rows
        xt = tl.load(
            x_ptr + src[None, :] * stride_xm + ks[:, None] * stride_xk,
            mask=k_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        d = tl.load(
            dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if SCALE:
            s = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            d = (d.to(tl.float32) * s[:, None]).to(dy_ptr.dtype.element_ty)
        if UPCAST:
            xt = xt.to(tl.float32)
            d = d.to(tl.float32)
        acc = tl.dot(xt, d, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def _configs(shapes: list[tuple[int, ...]], names: tuple[str, ...], extra: dict[str, int]) -> list[triton.Config]:
    return [
        triton.Config({**dict(zip(names, shape[:3], strict=True)), **extra}, num_warps=shape[3], num_stages=shape[4])
        for shape in shapes
    ]


def _fwd_configs(interp: bool) -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). H100 bf16: 128x256x64 / 8 warps is the
    # large-GEMM tile; 64/128-row tiles serve the fine-grained shapes (~512 rows per expert).
    cuda = [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 5),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 256, 32, 8, 5),
        (64, 256, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    interpreter = [(32, 64, 64, 4, 1), (16, 32, 32, 4, 1)]  # tests of the autotune path only
    return _configs(interpreter if interp else cuda, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), {"GROUP_M": 8})


def _wgrad_configs(interp: bool) -> list[triton.Config]:
    # (BLOCK_K, BLOCK_N, BLOCK_M = the reduction over rows, num_warps, num_stages).
    cuda = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (128, 256, 32, 8, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    interpreter = [(64, 64, 32, 4, 1), (32, 32, 16, 4, 1)]
    return _configs(interpreter if interp else cuda, ("BLOCK_K", "BLOCK_N", "BLOCK_M"), {})


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # Two fp32 accumulators with SwiGLU: 128x256 tiles would spill.
    swiglu = kwargs.get("SWIGLU", named_args.get("SWIGLU", False))
    kept = [c for c in configs if not (swiglu and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)]
    return kept or configs


FWD_KEY = ["N", "K", "E", "rows_bucket", "GATHER", "SCALE", "SWIGLU"]
WGRAD_KEY = ["N", "K", "rows_bucket", "GATHER", "SCALE"]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _fixed_fwd_meta(interp: bool, N: int, K: int) -> dict[str, int]:
    """The config used without autotuning."""
    if interp:  # ~ms per program instance: few, large tiles
        return {"BLOCK_M": 32, "BLOCK_N": _pow2(N, 16, 64), "BLOCK_K": _pow2(K, 16, 64), "GROUP_M": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _fixed_wgrad_meta(interp: bool, N: int, K: int) -> dict[str, int]:
    if interp:
        return {"BLOCK_M": 32, "BLOCK_N": _pow2(N, 16, 64), "BLOCK_K": _pow2(K, 16, 64)}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _tune(interp: bool, autotune: bool | None) -> bool:
    """None: autotune on CUDA unless MOE_TRITON_AUTOTUNE=0 (tests: one fixed config, fast compiles)."""
    if autotune is not None:
        return autotune
    return not interp and os.environ.get("MOE_TRITON_AUTOTUNE", "1") != "0"


def _rows_bucket(rows: int, experts: int) -> int:
    return triton.next_power_of_2(max(1, rows // max(experts, 1)))


def _dot_flags(dtype: torch.dtype, interp: bool) -> tuple[bool, str]:
    # The interpreter's bf16 tl.dot is wrong: upcast operands to fp32 there. On CUDA, fp32 dots
    # follow torch's TF32 setting so results match torch.matmul.
    if interp:
        return dtype == torch.bfloat16, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, "tf32"  # fp16 / bf16 operands: the default tensor-core path


@functools.cache
def _fwd_kernel(interp: bool, autotune: bool) -> Launchable:
    even_k = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}
    return build(_gmm_fwd_kernel, interp, _fwd_configs(interp), FWD_KEY, autotune, prune=_prune_fwd, heuristics=even_k)


@functools.cache
def _wgrad_kernel(interp: bool, autotune: bool) -> Launchable:
    return build(_gmm_wgrad_kernel, interp, _wgrad_configs(interp), WGRAD_KEY, autotune)


def gmm_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets_E1: torch.Tensor,
    token_idx_M: torch.Tensor | None = None,
    row_scale_M: torch.Tensor | None = None,
    swiglu: bool = False,
    store_pre: bool = False,
    autotune: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel; inputs are validated by the caller (moe.kernels.ops).

    Args:
        x: [M, K], or [T, K] read through token_idx_M.
        w: [E, K, N] (any strides; a transposed view gives the dX GEMM), [E, K, 2H] with SwiGLU.
        offsets_E1: [E + 1] int64 segment starts, offsets[0] = 0.
        token_idx_M: optional [M] int64 source row of x for every output row (fused gather).
        row_scale_M: optional [M] per-row scale applied in the epilogue (fused top-k weighting).
        swiglu: y = silu(h[:, :H]) * h[:, H:] computed from the fp32 accumulators.
        store_pre: also return h [M, 2H] (needed by the SwiGLU backward).
        autotune: None = autotune on CUDA only (unless MOE_TRITON_AUTOTUNE=0); True also autotunes
            under the interpreter (over two small configs).

    Returns:
        (y [M, N or H], pre [M, 2H] or an empty tensor); rows >= offsets[E] are zero.
    """
    rows = token_idx_M.shape[0] if token_idx_M is not None else x.shape[0]
    E, K, width = w.shape
    n_out = width // 2 if swiglu else width
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    pre = torch.empty(rows if store_pre else 0, width, dtype=x.dtype, device=x.device)
    if rows == 0 or n_out == 0:
        return y, pre
    interp = interpreting(x.device)
    tune = _tune(interp, autotune)
    upcast, precision = _dot_flags(x.dtype, interp)
    kernel = _fwd_kernel(interp, tune)
    pre_strides = (pre.stride(0), pre.stride(1)) if store_pre else (0, 0)
    args = (
        x,
        token_idx_M if token_idx_M is not None else offsets_E1,
        w,
        y,
        pre if store_pre else y,
        offsets_E1,
        row_scale_M if row_scale_M is not None else offsets_E1,
        rows,
        n_out,
        K,
        E,
        _rows_bucket(rows, E),
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        y.stride(0),
        y.stride(1),
        *pre_strides,
    )
    flags = dict(
        GATHER=token_idx_M is not None,
        SCALE=row_scale_M is not None,
        SWIGLU=swiglu,
        STORE_PRE=store_pre,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        E_POW2=max(2, triton.next_power_of_2(E)),
    )

    def grid(meta: dict) -> tuple[int]:
        return ((triton.cdiv(rows, meta["BLOCK_M"]) + E + 1) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    meta = {} if tune else _fixed_fwd_meta(interp, n_out, K)
    kernel[grid](*args, **flags, **meta)
    return y, pre


def gmm_wgrad(
    x: torch.Tensor,
    dy_MN: torch.Tensor,
    offsets_E1: torch.Tensor,
    token_idx_M: torch.Tensor | None = None,
    row_scale_M: torch.Tensor | None = None,
    autotune: bool | None = None,
) -> torch.Tensor:
    """dw [E, K, N] = per-expert x_rows^T @ (row_scale * dy); zeros for experts without rows.

    Args:
        x: [M, K], or [T, K] read through token_idx_M.
        dy_MN: [M, N] output gradient, rows sorted by expert.
        offsets_E1: [E + 1] int64 segment starts.
        token_idx_M: optional [M] int64 source row of x per row (fused gather).
        row_scale_M: optional [M] per-row scale of dy (fused top-k weighting).
        autotune: as in gmm_forward.
    """
    E = offsets_E1.shape[0] - 1
    K, N = x.shape[1], dy_MN.shape[1]
    dw = torch.empty(E, K, N, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    rows = dy_MN.shape[0]
    interp = interpreting(x.device)
    tune = _tune(interp, autotune)
    upcast, precision = _dot_flags(x.dtype, interp)
    kernel = _wgrad_kernel(interp, tune)
    args = (
        x,
        token_idx_M if token_idx_M is not None else offsets_E1,
        dy_MN,
        dw,
        offsets_E1,
        row_scale_M if row_scale_M is not None else offsets_E1,
        rows,
        N,
        K,
        _rows_bucket(rows, E),
        x.stride(0),
        x.stride(1),
        dy_MN.stride(0),
        dy_MN.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
    )
    flags = dict(
        GATHER=token_idx_M is not None,
        SCALE=row_scale_M is not None,
        UPCAST=upcast,
        DOT_PRECISION=precision,
    )

    def grid(meta: dict) -> tuple[int]:
        return (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    meta = {} if tune else _fixed_wgrad_meta(interp, N, K)
    kernel[grid](*args, **flags, **meta)
    return dw
