"""Weighted combine of expert outputs back to tokens (fp32 accumulation)."""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import registry

__all__ = ["unpermute"]


registry.register("unpermute", "reference", reference.unpermute)


def unpermute(
    y_ND: torch.Tensor, token_idx_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int, backend: str = "auto"
) -> torch.Tensor:
    """y_TD[t] = sum over rows j of token t of weights_N[j] * y_ND[j], summed in fp32."""
    return registry.resolve("unpermute", backend, y_ND.device)(y_ND, token_idx_N, weights_N, num_tokens)
