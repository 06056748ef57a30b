"""Routed experts with fused weights [E, ...], and the dense MLP used for shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe import ops
from moe.ops import triton as ops_triton


def activate(h_NF: torch.Tensor, activation: str, backend: str = "auto") -> torch.Tensor:
    """SwiGLU: silu(first half) * second half (`backend`'s fused op where it has one); GELU: gelu(h)."""
    if activation == "swiglu":
        return ops.swiglu(h_NF, backend)
    return F.gelu(h_NF)


class Experts(nn.Module):
    """E expert MLPs evaluated with grouped GEMMs over expert-sorted rows.

    Weights (x @ w layout, so each expert's matrix is [in, out]):
        w_in:  [E, D, F], F = 2H for SwiGLU (columns [:H] gate, [H:] up), F = H for GELU.
        w_out: [E, H, D].
    """

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.backend = activation, backend
        width = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND [N, D] sorted by expert, counts_E [E] -> [N, D]; rows past counts.sum() give 0."""
        # Under autocast the weights are cast to the activation dtype.
        w_in: torch.Tensor = self.w_in.to(x_ND.dtype)
        w_out: torch.Tensor = self.w_out.to(x_ND.dtype)
        h = ops.grouped_mm(x_ND, w_in, counts_E, self.backend)
        return ops.grouped_mm(activate(h, self.activation, self.backend), w_out, counts_E, self.backend)

    def forward_fused(
        self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, counts_E: torch.Tensor, weights_N: torch.Tensor
    ) -> torch.Tensor:
        """weights_N * expert(x_TD[token_idx_N]) with the gather and the weighting inside the GEMMs.

        Args:
            x_TD: [T, D] tokens (not sorted: row j of the result reads token token_idx_N[j]).
            token_idx_N: [N] int64, rows sorted by expert.
            counts_E: [E] int64 rows per expert.
            weights_N: [N] gate weight per row (0 for dropped copies).

        Returns:
            [N, D] weighted rows; rows past counts.sum() are 0. Sum them into tokens unweighted.
        """
        w_in: torch.Tensor = self.w_in.to(x_TD.dtype)
        w_out: torch.Tensor = self.w_out.to(x_TD.dtype)
        return ops_triton.expert_mlp(x_TD, w_in, w_out, counts_E, token_idx_N, weights_N, self.activation)


class MLP(nn.Module):
    """Dense MLP (shared experts), parameter names as in Hugging Face checkpoints."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
