"""SwiGLU on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu", "swiglu_backward"]


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


def swiglu_backward(h_NF: torch.Tensor, grad_NH: torch.Tensor) -> torch.Tensor:
    """d swiglu / d h_NF for the upstream grad_NH, in fp32 (fp64 stays fp64), returned in h's dtype.

    Written in differentiable ops, so gradients of gradients flow through it.
    """
    acc = torch.promote_types(h_NF.dtype, torch.float32)
    gate, up = h_NF.to(acc).chunk(2, dim=-1)
    g, sig = grad_NH.to(acc), torch.sigmoid(gate)
    return torch.cat([g * up * sig * (1 + gate * (1 - sig)), g * gate * sig], dim=-1).to(h_NF.dtype)
