"""Token counting and the stable sort of token copies by expert (no graph breaks)."""

from __future__ import annotations

import torch

__all__ = ["count_tokens", "sort_by_expert"]


def count_tokens(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Counts token copies per expert.

    Args:
        expert_ids: [N] or [T, K] int64 expert ids; -1 marks a dropped / unused slot.
        num_experts: E.

    Returns:
        [E] int64 counts (dropped slots are not counted).
    """
    ids = expert_ids.reshape(-1)
    # Dropped slots go to an extra bin E; scatter_add keeps exact int64 counts and, unlike
    # bincount, does not break torch.compile graphs.
    bins = torch.where(ids < 0, num_experts, ids)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[:num_experts]


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of token copies by expert id, dropped copies last.

    Args:
        expert_ids: [N] int64, values in [-1, E).

    Returns:
        order: [N] int64, order[j] = slot (index into expert_ids) of the j-th sorted copy.
            Copies of one expert are contiguous and keep their slot order (stable).
        counts: [E] int64 copies per expert; rows >= counts.sum() of the sorted order are dropped.
    """
    ids = expert_ids.reshape(-1)
    key = torch.where(ids < 0, num_experts, ids)
    order = torch.sort(key, stable=True).indices
    return order, count_tokens(ids, num_experts)
