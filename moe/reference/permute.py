"""Gather token rows into expert-sorted order."""

from __future__ import annotations

import torch

__all__ = ["permute"]


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """Returns x_sorted [N, D] with x_sorted[j] = x_TD[token_idx_N[j]] (autograd: index_add back)."""
    return x_TD.index_select(0, token_idx_N)
