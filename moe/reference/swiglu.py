"""SwiGLU on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(h_NF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h_NF = [gate | up].

    Args:
        h_NF: [N, F] with F = 2H: columns [:H] are the gate, [H:] the up projection.

    Returns:
        [N, H] in h's dtype.
    """
    if h_NF.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim [gate | up], got {h_NF.shape[-1]}")
    gate, up = h_NF.chunk(2, dim=-1)
    return F.silu(gate) * up
