"""Grouped matmul over contiguous, variable-size row segments (one segment per expert)."""

from __future__ import annotations

import torch

__all__ = ["segment_ends", "grouped_mm", "grouped_mm_wgrad"]


def segment_ends(counts_E: torch.Tensor, num_rows: int) -> list[int]:
    """End row of each expert's segment (one host read of counts_E).

    Raises:
        ValueError: a negative count, or counts that need more than num_rows rows.
    """
    ends, total = [], 0
    for e, c in enumerate(counts_E.tolist()):
        if c < 0:
            raise ValueError(f"counts[{e}] = {c} is negative; counts are rows per expert")
        total += c
        ends.append(total)
    if total > num_rows:
        raise ValueError(f"counts sum to {total} but x has only {num_rows} rows")
    return ends


def _segment_bounds(counts_E: torch.Tensor, num_rows: int) -> list[tuple[int, int, int]]:
    bounds, start = [], 0
    for e, end in enumerate(segment_ends(counts_E, num_rows)):
        if end > start:
            bounds.append((e, start, end))
        start = end
    return bounds


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e].

    Args:
        x_MK: [M, K] rows sorted by expert; rows past counts.sum() are padding.
        w_EKN: [E, K, N] one weight matrix per expert.
        counts_E: [E] int64 rows per expert (zeros allowed).

    Returns:
        [M, N]; padding rows are zero.
    """
    y = x_MK.new_zeros(x_MK.shape[0], w_EKN.shape[2])
    for e, start, end in _segment_bounds(counts_E, x_MK.shape[0]):
        y[start:end] = x_MK[start:end] @ w_EKN[e]
    return y


def grouped_mm_wgrad(x_MK: torch.Tensor, dy_MN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Weight gradient of grouped_mm: dw[e] = x_e^T @ dy_e, zeros for experts with no rows.

    Returns:
        [E, K, N] in x's dtype.
    """
    dw = x_MK.new_zeros(counts_E.shape[0], x_MK.shape[1], dy_MN.shape[1])
    for e, start, end in _segment_bounds(counts_E, x_MK.shape[0]):
        dw[e] = x_MK[start:end].t() @ dy_MN[start:end]
    return dw
