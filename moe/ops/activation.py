"""The expert activation as a registry op, so a backend can fuse it (backend "cpp": one pass)."""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import registry

__all__ = ["swiglu"]


registry.register("swiglu", "reference", reference.swiglu)


def swiglu(h_NF: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for h_NF = [gate | up] ([N, 2H] -> [N, H]), differentiable in h."""
    return registry.resolve("swiglu", backend, h_NF.device)(h_NF)
