"""The dispatcher seam: dispatch tokens to experts and combine their outputs.

dispatch(x_TD, routing) -> (x_sorted [N, D], counts [E_local], handle)
combine(y_sorted [N, D], handle) -> y_TD
The single-device dispatcher below and the expert-parallel one implement the same two calls,
so the layer does not change when parallelism arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe import ops
from moe.routing.base import Routing


@dataclass
class DispatchHandle:
    """What combine needs: the token of each sorted row and its gate weight (0 if dropped)."""

    token_idx: torch.Tensor  # [N] int64
    weights: torch.Tensor  # [N] fp32
    num_tokens: int


class LocalDispatcher:
    """Single-device dispatch: stable sort by expert, gather, weighted scatter-add back.

    N is static (routing.max_copies), so shapes do not depend on the routing: dropped copies
    sort last, their rows get weight 0, and the grouped GEMM leaves rows past counts.sum() at 0.
    """

    def __init__(self, num_experts: int, backend: str = "auto") -> None:
        self.num_experts, self.backend = num_experts, backend

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        ids = routing.expert_ids
        k = ids.shape[1]
        order, counts = ops.sort_by_expert(ids.reshape(-1), self.num_experts, self.backend)
        order = order[: routing.max_copies]
        token_idx = order // k
        routed = torch.arange(order.shape[0], device=order.device) < counts.sum()
        weights = torch.where(routed, routing.weights.reshape(-1)[order], 0.0)
        x_sorted = ops.permute(x_TD, token_idx, self.backend)
        return x_sorted, counts, DispatchHandle(token_idx, weights, x_TD.shape[0])

    def combine(self, y_sorted: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        return ops.unpermute(y_sorted, handle.token_idx, handle.weights, handle.num_tokens, self.backend)
