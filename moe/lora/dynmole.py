"""DynMoLE hybrid routing: Tsallis-entropy gated top-p selection of LoRA experts.

Shape legend: T = tokens, D = layer input dim, E = LoRA experts.

Formulas (REFERENCES.md, "Routers: DynMoLE"):
    S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1), q = 1.1, eps = 1e-5, normalised by its
    maximum (the uniform distribution over E experts).
    Selection: experts in descending probability while the cumulative probability is <= 0.75
    (the expert that crosses 0.75 is excluded), always at least the top 2, and all experts when
    the normalised entropy is > 0.9. Weights are the raw probabilities (not renormalised).
    Loss: 0.01 * mean_t S_q + 0.001 * E * sum_i f_i P_i, f_i = mean_t of the masked weights
    (soft, differentiable), P_i = mean_t p_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.routing.base import Router, Routing

__all__ = [
    "TSALLIS_Q",
    "TSALLIS_EPS",
    "tsallis_entropy",
    "max_tsallis_entropy",
    "normalized_tsallis_entropy",
    "dynmole_select",
    "DynMoLERouter",
]


TSALLIS_Q = 1.1
TSALLIS_EPS = 1e-5


def tsallis_entropy(probs_TE: torch.Tensor, q: float = TSALLIS_Q, eps: float = TSALLIS_EPS) -> torch.Tensor:
    """S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1) per row.

    Args:
        probs_TE: [T, E] probabilities (rows sum to 1).

    Returns:
        [T] entropies in probs' dtype.
    """
    return (1.0 - (probs_TE + eps).pow(q).sum(-1)) / (q - 1.0)


def max_tsallis_entropy(num_experts: int, q: float = TSALLIS_Q, eps: float = TSALLIS_EPS) -> float:
    """S_q of the uniform distribution over `num_experts` experts (the maximum)."""
    return (1.0 - num_experts * (1.0 / num_experts + eps) ** q) / (q - 1.0)


def normalized_tsallis_entropy(probs_TE: torch.Tensor, q: float = TSALLIS_Q, eps: float = TSALLIS_EPS) -> torch.Tensor:
    """S_q(p) / S_q(uniform over E): [T], about 0 for one-hot rows and 1 for uniform rows.

    With E = 1 both are the same tiny negative number, so the ratio is 1 (all experts = the one).
    """
    return tsallis_entropy(probs_TE, q, eps) / max_tsallis_entropy(probs_TE.shape[-1], q, eps)


def dynmole_select(
    probs_TE: torch.Tensor,
    top_p: float = 0.75,
    min_experts: int = 2,
    entropy_threshold: float = 0.9,
    q: float = TSALLIS_Q,
    eps: float = TSALLIS_EPS,
) -> torch.Tensor:
    """The DynMoLE selection mask.

    Experts are visited in descending probability (ties: lower index first); an expert is kept
    while the cumulative probability including it is <= top_p, so the one that crosses top_p is
    excluded; the first min(min_experts, E) are always kept; rows whose normalised Tsallis
    entropy is > entropy_threshold keep every expert. The comparison with top_p is exact (no
    tolerance): dyadic rows such as (0.5, 0.25, 0.25) keep the expert that lands on 0.75.

    Args:
        probs_TE: [T, E] probabilities.

    Returns:
        [T, E] bool mask of selected experts.
    """
    num_experts = probs_TE.shape[-1]
    sorted_p, order = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    keep_sorted = torch.cumsum(sorted_p, dim=-1) <= top_p
    rank = torch.arange(num_experts, device=probs_TE.device)
    keep_sorted = keep_sorted | (rank < min(min_experts, num_experts))
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    high_entropy = normalized_tsallis_entropy(probs_TE, q, eps) > entropy_threshold
    return mask | high_entropy.unsqueeze(-1)


class DynMoLERouter(Router):
    """logits = x W^T in fp32 (W [E, D]); p = softmax; DynMoLE hybrid selection and loss.

    Routing.expert_ids is [T, E]: slot j holds expert j when selected, else -1; weights are the
    unrenormalised probabilities of the selected experts (0 elsewhere).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        entropy_coef: float = 0.01,
        balance_coef: float = 0.001,
        top_p: float = 0.75,
        min_experts: int = 2,
        entropy_threshold: float = 0.9,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, num_experts
        self.entropy_coef, self.balance_coef = entropy_coef, balance_coef
        self.top_p, self.min_experts, self.entropy_threshold = top_p, min_experts, entropy_threshold
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def _select(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [T, E], selection mask [T, E], ids [T, E] with -1 where not selected)."""
        acc = torch.promote_types(x_TD.dtype, torch.float32)  # gate in fp32 (fp64 stays fp64)
        probs_TE = F.softmax(x_TD.to(acc) @ self.weight.to(acc).t(), dim=-1)
        mask_TE = dynmole_select(probs_TE.detach(), self.top_p, self.min_experts, self.entropy_threshold)
        return probs_TE, mask_TE, torch.where(mask_TE, torch.arange(self.num_experts, device=x_TD.device), -1)

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E], ids [T, E], -1 where not selected) of forward; no losses."""
        probs_TE, _, ids_TE = self._select(x_TD)
        return probs_TE, ids_TE

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """Routes each token to the experts DynMoLE selects (top-p >= 2, all when the entropy is high).

        Args:
            x_TD: [T, D] inputs of the adapted Linear.
            token_mask, seq_len: accepted for the Router interface; unused.
        Returns:
            Routing with expert_ids [T, E] (-1 where not selected), weights [T, E] (probs times the
            selection mask), probs [T, E], aux losses (tsallis, balance) when their coefficients are > 0.
        """
        probs_TE, mask_TE, expert_ids_TE = self._select(x_TD)
        weights_TE = probs_TE * mask_TE
        losses: dict[str, torch.Tensor] = {}
        if self.entropy_coef > 0 and x_TD.shape[0] > 0:
            losses["tsallis"] = self.entropy_coef * tsallis_entropy(probs_TE).mean()
        if self.balance_coef > 0 and x_TD.shape[0] > 0:
            f_E, p_E = weights_TE.mean(0), probs_TE.mean(0)
            losses["balance"] = self.balance_coef * self.num_experts * (f_E * p_E).sum()
        return Routing(expert_ids_TE, weights_TE, losses, probs_TE, x_TD.shape[0] * self.num_experts)
