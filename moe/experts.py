"""The experts seam, the expert MLP (written once), routed experts with fused weights [E, ...],
and the dense MLP of the shared experts.

Every kind of routed experts (Experts here, moe.parallel.ParallelExperts, moe.offload's
OffloadedExperts) implements ExpertsBase: forward(x_ND, counts_E) -> y_ND on rows sorted by
expert, plus an optional fused capability (supports_fused / forward_fused) that a dispatcher
asks for: rows gathered and gate-weighted inside the GEMMs (the Triton path).

Shape legend: T tokens, N rows sorted by expert, D dim, H expert hidden, F first-GEMM width
(2H for SwiGLU, H for GELU), E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe import ops
from moe.ops import triton as ops_triton

__all__ = ["ExpertsBase", "Experts", "MLP", "activate", "expert_mlp", "swiglu_oai", "shared_output", "supports_fused"]


SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT = 1.702, 7.0


def swiglu_oai(h_NF: torch.Tensor, alpha: float = SWIGLU_OAI_ALPHA, limit: float = SWIGLU_OAI_LIMIT) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU on [gate | up] halves: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g),
    g = min(gate, l). (HF interleaves gate/up columns; from_hf de-interleaves them into halves.)"""
    hidden = h_NF.shape[-1] // 2
    gate = h_NF[..., :hidden].clamp(min=None, max=limit)
    up = h_NF[..., hidden:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def activate(
    h_NF: torch.Tensor,
    activation: str,
    backend: str = "auto",
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
) -> torch.Tensor:
    """SwiGLU: silu(first half) * second half (`backend`'s fused op where it has one); GELU: gelu(h);
    "swiglu_oai": GPT-OSS's clamped SwiGLU with alpha and limit (plain torch ops)."""
    if activation == "swiglu":
        return ops.swiglu(h_NF, backend)
    if activation == "swiglu_oai":
        return swiglu_oai(h_NF, alpha, limit)
    return F.gelu(h_NF)


def _row_bias(bias_EX: torch.Tensor, counts_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N, X]: the bias of each expert-sorted row's expert; 0 for rows past counts.sum()."""
    ends = counts_E.cumsum(0)
    rows = torch.arange(num_rows, device=counts_E.device)
    expert_N = torch.bucketize(rows, ends, right=True)  # in [0, E]; E = past the last expert's rows
    padded = torch.cat([bias_EX, bias_EX.new_zeros(1, bias_EX.shape[1])])
    return padded[expert_N]


def expert_mlp(
    x_ND: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts_E: torch.Tensor | None,
    activation: str,
    backend: str = "auto",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
) -> torch.Tensor:
    """The expert MLP, act(x w_in (+ b_in)) w_out (+ b_out), in x's dtype: the one definition every
    kind of experts uses.

    Args:
        x_ND: [N, D] rows (sorted by expert when counts_E is given).
        w_in: [E, D, F] with counts_E, or [D, F] for one expert (counts_E None).
        w_out: [E, H, D] with counts_E, or [H, D].
        counts_E: [E] int64 rows per expert (grouped GEMMs; rows past counts.sum() give 0), or None.
        activation: "swiglu" (columns [:H] gate, [H:] up), "swiglu_oai" (same halves, clamped) or "gelu".
        backend: op backend of the grouped GEMMs and the activation.
        b_in, b_out: optional biases [E, F] and [E, D] (or [F], [D] for one expert); rows past
            counts.sum() still give 0.
        alpha, limit: of "swiglu_oai".

    Returns:
        [N, D].
    """
    w_in, w_out = w_in.to(x_ND.dtype), w_out.to(x_ND.dtype)  # under autocast: the activation dtype
    b_in = None if b_in is None else b_in.to(x_ND.dtype)
    b_out = None if b_out is None else b_out.to(x_ND.dtype)
    if counts_E is None:
        h = x_ND @ w_in if b_in is None else x_ND @ w_in + b_in
        y = activate(h, activation, backend, alpha, limit) @ w_out
        return y if b_out is None else y + b_out
    if activation == "swiglu" and b_in is None:  # one op for both GEMMs where the backend fuses them
        y = ops.swiglu_experts(x_ND, w_in, w_out, counts_E, backend)
        return y if b_out is None else y + _row_bias(b_out, counts_E, y.shape[0])
    h = ops.grouped_mm(x_ND, w_in, counts_E, backend)
    if b_in is not None:
        h = h + _row_bias(b_in, counts_E, h.shape[0])
    if activation == "swiglu":
        y = ops.swiglu_grouped_mm(h, w_out, counts_E, backend)  # fused where the backend has it
    else:
        y = ops.grouped_mm(activate(h, activation, backend, alpha, limit), w_out, counts_E, backend)
    return y if b_out is None else y + _row_bias(b_out, counts_E, y.shape[0])


class ExpertsBase(nn.Module):
    """The experts protocol: what a dispatcher calls on routed experts of any kind.

    forward(x_ND, counts_E) -> y_ND
        x_ND [N, D] rows sorted by (local) expert, counts_E [E] int64 rows per expert;
        returns [N, D], rows past counts.sum() are 0.
    supports_fused(device) -> bool (optional capability, False by default)
        Whether forward_fused may be called on `device`.
    forward_fused(x_TD, token_idx_N, counts_E, weights_N) -> y_ND (only if supported)
        weights_N * expert(x_TD[token_idx_N]), gather and weighting inside the GEMMs.
    """

    def supports_fused(self, device: torch.device) -> bool:
        """Whether forward_fused runs on `device`; experts without a fused kernel say False."""
        return False

    def forward_fused(
        self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, counts_E: torch.Tensor, weights_N: torch.Tensor
    ) -> torch.Tensor:
        """The fused path (Triton): gathers rows by token index inside the first GEMM.

        Only called where supports_fused(device) is True.
        """
        raise NotImplementedError(f"{type(self).__name__} has no fused path (supports_fused is False)")


def supports_fused(experts: nn.Module, device: torch.device) -> bool:
    """experts.supports_fused(device), False for experts that do not implement the capability."""
    probe = getattr(experts, "supports_fused", None)
    return bool(probe(device)) if callable(probe) else False


class Experts(ExpertsBase):
    """E expert MLPs evaluated with grouped GEMMs over expert-sorted rows.

    Weights (x @ w layout, so each expert's matrix is [in, out]):
        w_in:  [E, D, F], F = 2H for SwiGLU and "swiglu_oai" (columns [:H] gate, [H:] up), F = H for GELU.
        w_out: [E, H, D].
        b_in [E, F], b_out [E, D]: with bias=True (GPT-OSS); None otherwise.
    alpha, limit: of activation="swiglu_oai" (GPT-OSS's clamped SwiGLU).
    """

    b_in: torch.Tensor | None
    b_out: torch.Tensor | None

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "swiglu",
        backend: str = "auto",
        *,
        bias: bool = False,
        alpha: float = SWIGLU_OAI_ALPHA,
        limit: float = SWIGLU_OAI_LIMIT,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.backend = activation, backend
        self.alpha, self.limit = float(alpha), float(limit)
        width = 2 * hidden_dim if activation in ("swiglu", "swiglu_oai") else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases start at 0.
        """Re-initialises the expert weights (and biases) as at construction."""
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND [N, D] sorted by expert, counts_E [E] -> [N, D]; rows past counts.sum() give 0."""
        return expert_mlp(
            x_ND,
            self.w_in,
            self.w_out,
            counts_E,
            self.activation,
            self.backend,
            self.b_in,
            self.b_out,
            self.alpha,
            self.limit,
        )

    def supports_fused(self, device: torch.device) -> bool:
        """True where this experts' backend resolves to the Triton grouped GEMM on `device` and the
        kernel covers the options: no biases, activation "swiglu" or "gelu"."""
        if self.b_in is not None or self.activation not in ("swiglu", "gelu"):
            return False
        return ops_triton.uses_triton(self.backend, device)

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
        """x [..., D] -> [..., D]."""
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


def shared_output(mlp: nn.Module | None, gate: nn.Module | None, x_TD: torch.Tensor) -> torch.Tensor | None:
    """The shared-expert block: mlp(x) [T, D], scaled by sigmoid(gate(x)) when gated; None without one."""
    if mlp is None:
        return None
    shared = mlp(x_TD)
    return shared if gate is None else torch.sigmoid(gate(x_TD)) * shared
