"""Capacity-based token dropping for token-choice routers.

Priority (as GShard and DeepSpeed): all first choices before any second choice, and within
the same choice rank, earlier tokens first. Copies past an expert's capacity are dropped
(expert id -1, weight 0) and counted.
"""

from __future__ import annotations

import math

import torch

from moe.reference import sort_by_expert


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
