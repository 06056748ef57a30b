"""Sorting token copies by expert and gathering them (the dispatch half of the data path)."""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import registry

__all__ = ["sort_by_expert", "permute"]


registry.register("sort_by_expert", "reference", reference.sort_by_expert)
registry.register("permute", "reference", reference.permute)


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [N], counts [E]): stable sort of copies by expert, dropped (-1) copies last."""
    return registry.resolve("sort_by_expert", backend, expert_ids.device)(expert_ids, num_experts)


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x_sorted [N, D] = x_TD[token_idx_N], differentiable in x."""
    return registry.resolve("permute", backend, x_TD.device)(x_TD, token_idx_N)
