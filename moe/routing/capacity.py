"""Capacity-based token dropping for token-choice routers.

Priority (as GShard and DeepSpeed): all first choices before any second choice, and within
the same choice rank, earlier tokens first. Copies past an expert's capacity are dropped
(expert id -1, weight 0) and counted.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from moe.reference import sort_by_expert
from moe.routing.base import Routing

__all__ = ["expert_capacity", "apply_capacity", "drop_over_capacity"]


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * K / E): copies one expert may keep."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drops copies beyond `capacity` per expert.

    Returns:
        (expert_ids [T, K] with -1 for dropped copies, weights [T, K] zeroed there,
         dropped: int64 scalar tensor, the number of copies dropped).
    """
    num_tokens, k = expert_ids_TK.shape
    ids_KT = expert_ids_TK.t().reshape(-1)  # choice-rank-major priority
    order, counts = sort_by_expert(ids_KT, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_ids = ids_KT[order]
    rank_sorted = torch.arange(ids_KT.numel(), device=ids_KT.device) - starts[sorted_ids.clamp(min=0)]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    keep = ((ids_KT >= 0) & (rank < capacity)).view(k, num_tokens).t()
    dropped = ((expert_ids_TK >= 0) & ~keep).sum()
    return torch.where(keep, expert_ids_TK, -1), torch.where(keep, weights_TK, 0.0), dropped


def drop_over_capacity(
    routing: Routing,
    x_TD: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    token_mask_T: torch.Tensor | None = None,
) -> tuple[Routing, torch.Tensor]:
    """The routing with copies past each expert's capacity ceil(cf * T * K / E) dropped.

    A token with a non-finite input or gate weight is routed nowhere first, so its values
    cannot change who else fits; padding (token_mask_T False) takes no slot and is not counted.

    Returns:
        (routing with expert_ids -1 and weights 0 where dropped and max_copies bounded by E * capacity,
         dropped: int64 scalar tensor, the number of real copies dropped).
    """
    finite = torch.isfinite(x_TD).all(dim=1, keepdim=True) & torch.isfinite(routing.weights).all(1, True)
    if token_mask_T is not None:
        finite = finite & token_mask_T.unsqueeze(1)
    ids = torch.where(finite, routing.expert_ids, -1)
    cap = expert_capacity(x_TD.shape[0], routing.expert_ids.shape[1], num_experts, capacity_factor)
    ids, weights, dropped = apply_capacity(ids, routing.weights, num_experts, cap)
    kept = dataclasses.replace(
        routing, expert_ids=ids, weights=weights, max_copies=min(routing.max_copies, num_experts * cap)
    )
    return kept, dropped
