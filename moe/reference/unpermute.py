"""Scatter expert outputs back to tokens with the top-k weighted sum accumulated in fp32."""

from __future__ import annotations

import torch

__all__ = ["unpermute", "unpermute_backward"]


def unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Combines expert outputs.

    Args:
        y_ND: [N, D] expert outputs in sorted order (rows of dropped copies are zero).
        token_idx_N: [N] int64 token each row belongs to.
        weights_N: [N] gate weight of each row (0 for dropped copies), any float dtype.
        num_tokens: T.

    Returns:
        [T, D] in y's dtype: out[t] = sum_j [token_idx_N[j] == t] * weights_N[j] * y_ND[j],
        summed in fp32 (fp64 stays fp64) so bf16/fp16 experts lose no precision in the k-way sum.
    """
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    out = torch.zeros(num_tokens, y_ND.shape[1], dtype=acc, device=y_ND.device)
    out = out.index_add(0, token_idx_N, y_ND.to(acc) * weights_N.to(acc).unsqueeze(1))
    return out.to(y_ND.dtype)


def unpermute_backward(
    grad_TD: torch.Tensor, y_ND: torch.Tensor, token_idx_N: torch.Tensor, weights_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of y_ND in y's dtype, grad of weights_N in its dtype) of unpermute, summed in fp32.

    Written in differentiable ops, so gradients of gradients flow through it.
    """
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    g = grad_TD.to(acc).index_select(0, token_idx_N)
    return (g * weights_N.to(acc)[:, None]).to(y_ND.dtype), (g * y_ND.to(acc)).sum(1).to(weights_N.dtype)
