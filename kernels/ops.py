"""The Triton grouped GEMMs as torch.library ops (namespace moe_triton), with fake kernels and
autograd, and the user-facing entry points.

Shapes: M rows (sorted by expert), T token rows of a gathered input, K in features, N out
features (H with SwiGLU, whose weight has 2H columns: [:H] gate, [H:] up), E experts.

    grouped_mm(x_MK, w_EKN, counts_E)                       same semantics as moe.reference.grouped_mm
    gather_grouped_mm(x_TK, w_EKN, counts_E, token_idx_M)   x rows read through token_idx (no x_sorted)
    grouped_mm_weighted(x_MK, w_EKN, counts_E, weights_M)   every output row times its gate weight

Importing this module defines the ops (like torch.library itself) but imports no Triton: the
kernels module is imported the first time an op runs. On CUDA the kernels are compiled and
autotuned; on CPU they run in Triton's interpreter (slow: for tests only).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    """[E + 1] int64 segment starts (no host sync)."""
    return F.pad(torch.cumsum(counts_E, 0, dtype=torch.int64), (1, 0))


def _kernel_layout(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as the kernels can address it: 1-D index/scale vectors contiguous (read with stride 1),
    and no stride * extent past int32 in a dimension the kernels index with int32 offsets
    (only the row dimension is int64): such a (transposed, strided) input is copied."""
    if t is None:
        return None
    if t.dim() == 1:
        return t.contiguous()
    if any(st * (n - 1) >= 2**31 for st, n in zip(t.stride()[1:], t.shape[1:], strict=True)):
        return t.contiguous()
    return t


def _kernels():  # type: ignore[no-untyped-def]
    from . import grouped_gemm

    return grouped_gemm


@torch.library.custom_op("moe_triton::gmm", mutates_args=())
def _gmm(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    token_idx: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    swiglu: bool,
    store_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x, w, token_idx, row_scale = (_kernel_layout(t) for t in (x, w, token_idx, row_scale))
    return _kernels().gmm_forward(x, w, _offsets(counts), token_idx, row_scale, swiglu, store_pre)


@_gmm.register_fake
def _(x, w, counts, token_idx, row_scale, swiglu, store_pre):  # type: ignore[no-untyped-def]
    rows = token_idx.shape[0] if token_idx is not None else x.shape[0]
    width = w.shape[2]
    y = x.new_empty(rows, width // 2 if swiglu else width)
    return y, x.new_empty(rows if store_pre else 0, width)


@torch.library.custom_op("moe_triton::gmm_wgrad", mutates_args=())
def _gmm_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    counts: torch.Tensor,
    token_idx: torch.Tensor | None,
    row_scale: torch.Tensor | None,
) -> torch.Tensor:
    x, dy, token_idx, row_scale = (_kernel_layout(t) for t in (x, dy, token_idx, row_scale))
    return _kernels().gmm_wgrad(x, dy, _offsets(counts), token_idx, row_scale)


@_gmm_wgrad.register_fake
def _(x, dy, counts, token_idx, row_scale):  # type: ignore[no-untyped-def]
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


def _swiglu(h_MF: torch.Tensor) -> torch.Tensor:
    gate, up = h_MF.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(h_MF: torch.Tensor, dz_MH: torch.Tensor) -> torch.Tensor:
    gate, up = h_MF.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    d_gate = dz_MH * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, dz_MH * gate * sig], dim=-1)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, w, counts, token_idx, row_scale, swiglu, _store_pre = inputs
    _y, pre = output
    ctx.swiglu = swiglu
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, w, counts, token_idx, row_scale, pre)


def _backward(ctx, dy, _dpre):  # type: ignore[no-untyped-def]
    # y = s * act(h), h = x[idx] @ w[e]. dz = s * dy; ds = <dy, act(h)>; dh = act'(h) dz;
    # dx[idx] += dh @ w[e]^T; dw[e] = x[idx]^T dh (the scale fused into the wgrad loads).
    x, w, counts, token_idx, row_scale, pre = ctx.saved_tensors
    need_x, need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    w_t = w.transpose(1, 2)
    dx_rows = ds = dx = dw = None
    if ctx.swiglu:
        if pre.shape[0] != dy.shape[0] or torch.is_grad_enabled():
            # Forward did not keep h, or create_graph=True: the kept h is a constant to autograd,
            # so recompute it differentiably (else second derivatives through h would be lost).
            pre = _gmm(x, w, counts, token_idx, None, False, False)[0]
        dz = dy.float()
        if row_scale is not None:
            if need_s:
                ds = (dz * _swiglu(pre.float())).sum(1).to(row_scale.dtype)
            dz = dz * row_scale.float()[:, None]
        dh, dh_scale = _swiglu_backward(pre.float(), dz).to(x.dtype), None
    else:
        dh, dh_scale = dy, row_scale
        if row_scale is not None and need_s:
            g = _gmm(dy, w_t, counts, None, None, False, False)[0]
            x_rows = x if token_idx is None else x.index_select(0, token_idx)
            ds = (g.float() * x_rows.float()).sum(1).to(row_scale.dtype)
            dx_rows = (g.float() * row_scale.float()[:, None]).to(x.dtype)
    if need_x:
        if dx_rows is None:
            dx_rows = _gmm(dh, w_t, counts, None, dh_scale, False, False)[0]
        if token_idx is None:
            dx = dx_rows
        else:
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            dx = dx.index_add_(0, token_idx, dx_rows.float()).to(x.dtype)
    if need_w:
        dw = _gmm_wgrad(x, dh, counts, token_idx, dh_scale)
    return dx, dw, None, None, ds, None, None


_gmm.register_autograd(_backward, setup_context=_setup_context)


def _wgrad_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    ctx.save_for_backward(*inputs)


def _wgrad_backward(ctx, ddw):  # type: ignore[no-untyped-def]
    # dw[e] = sum over rows r of e: x[idx_r]^T (s_r dy_r). Needed for gradients of gradients.
    x, dy, counts, token_idx, row_scale = ctx.saved_tensors
    need_x, need_dy, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    dx = ddy = ds = None
    if need_dy or (need_s and row_scale is not None):
        xw = _gmm(x, ddw, counts, token_idx, None, False, False)[0]  # [M, N]: x[idx_r] @ ddw[e]
        if need_dy:
            ddy = xw if row_scale is None else (xw.float() * row_scale.float()[:, None]).to(dy.dtype)
        if need_s and row_scale is not None:
            ds = (xw.float() * dy.float()).sum(1).to(row_scale.dtype)
    if need_x:
        rows = _gmm(dy, ddw.transpose(1, 2), counts, None, row_scale, False, False)[0]  # [M, K]
        if token_idx is None:
            dx = rows
        else:
            dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            dx = dx.index_add_(0, token_idx, rows.float()).to(x.dtype)
    return dx, ddy, None, None, ds


_gmm_wgrad.register_autograd(_wgrad_backward, setup_context=_wgrad_setup_context)


def _check(
    x: torch.Tensor,
    w: torch.Tensor,
    counts_E: torch.Tensor,
    token_idx_M: torch.Tensor | None,
    weights_M: torch.Tensor | None,
    swiglu: bool,
) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"x must be [rows, K] and w [E, K, N]; got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} features but w expects K={w.shape[1]} (w is [E, K, N])")
    if x.dtype != w.dtype or x.dtype not in _FLOATS:
        raise TypeError(
            f"x ({x.dtype}) and w ({w.dtype}) must share one of {_FLOATS}; cast them, or use backend='reference'"
        )
    if counts_E.dim() != 1 or counts_E.shape[0] != w.shape[0] or counts_E.is_floating_point():
        raise ValueError(
            f"counts must be an integer [E={w.shape[0]}] tensor; got {counts_E.dtype} {tuple(counts_E.shape)}"
        )
    if swiglu and w.shape[2] % 2:
        raise ValueError(f"SwiGLU needs an even number of weight columns (gate | up); got {w.shape[2]}")
    rows = x.shape[0]
    if token_idx_M is not None:
        if token_idx_M.dim() != 1 or token_idx_M.is_floating_point():
            raise ValueError(
                f"token_idx must be a 1-D integer tensor; got {token_idx_M.dtype} {tuple(token_idx_M.shape)}"
            )
        rows = token_idx_M.shape[0]
    if weights_M is not None and weights_M.shape != (rows,):
        raise ValueError(f"weights must be [{rows}] (one per row); got {tuple(weights_M.shape)}")
    tensors = [t for t in (w, counts_E, token_idx_M, weights_M) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all inputs must be on x's device {x.device}; got {[str(t.device) for t in tensors]}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Checked where it costs no device sync; on CUDA rows past `rows` are never written.
        if counts_E.numel() and int(counts_E.min()) < 0:
            e = int(torch.argmin(counts_E))
            raise ValueError(f"counts[{e}] = {int(counts_E[e])} is negative; counts are rows per expert")
        if int(counts_E.sum()) > rows:
            raise ValueError(f"counts sum to {int(counts_E.sum())} but there are only {rows} rows")
        if token_idx_M is not None and token_idx_M.numel():
            lo, hi = int(token_idx_M.min()), int(token_idx_M.max())
            if lo < 0 or hi >= x.shape[0]:
                raise ValueError(f"token_idx must be in [0, {x.shape[0]}) (rows of x); got values in [{lo}, {hi}]")


def fused_grouped_mm(
    x: torch.Tensor,
    w_EKF: torch.Tensor,
    counts_E: torch.Tensor,
    token_idx_M: torch.Tensor | None = None,
    weights_M: torch.Tensor | None = None,
    activation: Literal["none", "swiglu"] = "none",
    save_pre: bool = True,
) -> torch.Tensor:
    """y[r] = weights[r] * act(x[token_idx[r]] @ w[e(r)]) in one kernel, differentiable in x, w, weights.

    Args:
        x: [M, K] rows sorted by expert, or [T, K] token rows when token_idx_M is given.
        w_EKF: [E, K, F]; F = N, or 2H for SwiGLU (columns [:H] gate, [H:] up).
        counts_E: [E] int64 rows per expert; row r belongs to the expert whose segment holds it.
        token_idx_M: optional [M] int64 in [0, T): the row of x each output row reads (fused gather).
        weights_M: optional [M] gate weight per row, applied to the fp32 accumulator (fused weighting).
        activation: "swiglu" computes silu(gate) * up from the accumulators in the epilogue.
        save_pre: keep the SwiGLU pre-activation [M, 2H] for backward (False: recompute it).

    Returns:
        [M, N] (or [M, H]) in x's dtype; rows >= counts.sum() are zero.
    """
    if activation not in ("none", "swiglu"):
        raise ValueError(f"activation must be 'none' or 'swiglu'; got {activation!r}")
    swiglu = activation == "swiglu"
    _check(x, w_EKF, counts_E, token_idx_M, weights_M, swiglu)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_EKF, weights_M))
    return _gmm(x, w_EKF, counts_E, token_idx_M, weights_M, swiglu, swiglu and save_pre and needs_grad)[0]


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e]; rows past counts.sum() are zero (as moe.reference)."""
    return fused_grouped_mm(x_MK, w_EKN, counts_E)


def gather_grouped_mm(
    x_TK: torch.Tensor,
    w_EKF: torch.Tensor,
    counts_E: torch.Tensor,
    token_idx_M: torch.Tensor,
    activation: Literal["none", "swiglu"] = "none",
) -> torch.Tensor:
    """act(permute(x_TK, token_idx_M) grouped-matmul w) without materialising the permuted rows: [M, F or H]."""
    return fused_grouped_mm(x_TK, w_EKF, counts_E, token_idx_M=token_idx_M, activation=activation)


def grouped_mm_weighted(
    x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, weights_M: torch.Tensor
) -> torch.Tensor:
    """grouped_mm(x, w, counts) * weights[:, None], the weighting done in the GEMM epilogue in fp32: [M, N]."""
    return fused_grouped_mm(x_MK, w_EKN, counts_E, weights_M=weights_M)


def grouped_mm_wgrad(x_MK: torch.Tensor, dy_MN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """dw[e] = x_e^T @ dy_e: [E, K, N], zeros for experts with no rows (as moe.reference.grouped_mm_wgrad)."""
    return _gmm_wgrad(x_MK, dy_MN, counts_E, None, None)
