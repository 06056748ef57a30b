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
from moe.ops import triton as ops_triton
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
        counts, handle = self.route(routing, x_TD.shape[0])
        x_sorted = ops.permute(x_TD, handle.token_idx, self.backend)
        return x_sorted, counts, handle

    def route(self, routing: Routing, num_tokens: int) -> tuple[torch.Tensor, DispatchHandle]:
        """The sort half of dispatch, no gather: (counts [E], handle with token_idx [N] and weights [N])."""
        ids = routing.expert_ids
        k = ids.shape[1]
        order, counts = ops.sort_by_expert(ids.reshape(-1), self.num_experts, self.backend)
        order = order[: routing.max_copies]
        token_idx = order // k
        routed = torch.arange(order.shape[0], device=order.device) < counts.sum()
        weights = torch.where(routed, routing.weights.reshape(-1)[order], 0.0)
        return counts, DispatchHandle(token_idx, weights, num_tokens)

    def fused(self, device: torch.device) -> bool:
        """Whether the experts gather and weight rows inside their GEMMs on `device` (backend triton).

        Then the layer calls route -> Experts.forward_fused -> combine_weighted instead of
        dispatch -> Experts.forward -> combine.
        """
        return ops_triton.uses_triton(self.backend, device)

    def combine_weighted(self, y_weighted: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sums rows already multiplied by their gate weights into tokens (fp32): y_TD [T, D]."""
        ones = torch.ones_like(handle.weights)
        return ops.unpermute(y_weighted, handle.token_idx, ones, handle.num_tokens, self.backend)

    def combine(self, y_sorted: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        return ops.unpermute(y_sorted, handle.token_idx, handle.weights, handle.num_tokens, self.backend)
