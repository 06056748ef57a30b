"""The dispatcher seam: dispatch tokens to experts and combine their outputs.

    dispatch(x_TD, routing) -> (x_sorted [N, D], counts [E_local], state)
    combine(y_sorted [N, D], state) -> y_TD [T, D]
    run(x_TD, routing, experts, overlap=None) -> (y_TD, overlap(x_TD))
        = dispatch -> experts(x_sorted, counts) -> combine, written once in Dispatcher.run.

Every path implements it: LocalDispatcher (one device; the fused Triton path when the experts
offer it, see moe.experts.ExpertsBase.supports_fused) and, across ranks, moe.parallel's
ExpertParallel (planned mode and pipelining over ExpertParallelDispatcher). `overlap` is work
on the same tokens that does not depend on the routed experts (the layer's shared experts):
a dispatcher may run it while its exchanges are in flight.

Shape legend: T tokens, D dim, E experts, K top-k slots, N routed rows (routing.max_copies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe import ops
from moe.experts import supports_fused
from moe.ops import triton as ops_triton
from moe.routing.base import Routing

__all__ = ["Dispatcher", "LocalDispatcher", "DispatchHandle", "Overlap"]

Overlap = Callable[[torch.Tensor], "torch.Tensor | None"]


class Dispatcher:
    """Base of dispatchers: subclasses implement dispatch and combine, and may override run
    (to fuse or pipeline the three steps)."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(x_sorted [N, D] rows sorted by expert, counts [E_local] int64, state for combine)."""
        raise NotImplementedError

    def combine(self, y_sorted: torch.Tensor, state: Any) -> torch.Tensor:
        """y_sorted [N, D] (the experts' rows, in dispatch's order) -> y_TD [T, D], gate-weighted sum."""
        raise NotImplementedError

    def run(
        self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module, overlap: Overlap | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dispatch -> experts(x_sorted, counts) -> combine: (y_TD [T, D], overlap(x_TD) or None)."""
        x_sorted, counts, state = self.dispatch(x_TD, routing)
        y_TD = self.combine(experts(x_sorted, counts), state)
        return y_TD, overlap(x_TD) if overlap is not None else None


@dataclass
class DispatchHandle:
    """What combine needs: the token of each sorted row and its gate weight (0 if dropped)."""

    token_idx: torch.Tensor  # [N] int64
    weights: torch.Tensor  # [N] fp32
    num_tokens: int


class LocalDispatcher(Dispatcher):
    """Single-device dispatch: stable sort by expert, gather, weighted scatter-add back.

    N is static (routing.max_copies), so shapes do not depend on the routing: dropped copies
    sort last, their rows get weight 0, and the grouped GEMM leaves rows past counts.sum() at 0.
    When the experts support the fused path on the input's device (and this dispatcher's
    backend is Triton), run sorts only and the experts gather and weight rows inside their GEMMs.
    """

    def __init__(self, num_experts: int, backend: str = "auto") -> None:
        self.num_experts, self.backend = num_experts, backend

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Sorts the routed copies by expert and gathers their rows.

        Args:
            x_TD: [T, D] tokens.
            routing: expert_ids [T, K] and weights [T, K] (id -1 = not routed).
        Returns:
            x_sorted [N, D] (rows grouped by expert, padding rows last), counts [E] int64, and the handle
            (token_idx [N], weights [N]) that combine needs; N = routing.max_copies.
        """
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

    def fused(self, device: torch.device, experts: nn.Module | None = None) -> bool:
        """Whether run takes the fused path on `device`: this dispatcher's backend is Triton there
        and `experts` (when given) support it (ExpertsBase.supports_fused)."""
        if not ops_triton.uses_triton(self.backend, device):
            return False
        return experts is None or supports_fused(experts, device)

    def run(
        self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module, overlap: Overlap | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dispatch -> experts -> combine, or the fused path when `fused` says so.

        Args:
            x_TD: [T, D] tokens.
            routing: expert_ids [T, K], weights [T, K].
            experts: the routed experts (ExpertsBase): [N, D] rows and counts [E] -> [N, D].
            overlap: optional function of x_TD (the shared experts), run after the experts here.
        Returns:
            (y_TD [T, D] fp32-accumulated weighted sum in x's dtype, overlap(x_TD) or None).
        """
        if not self.fused(x_TD.device, experts):
            return super().run(x_TD, routing, experts, overlap)
        counts, handle = self.route(routing, x_TD.shape[0])
        y_weighted = experts.forward_fused(x_TD, handle.token_idx, counts, handle.weights)  # type: ignore[operator]
        return self.combine_weighted(y_weighted, handle), overlap(x_TD) if overlap is not None else None

    def combine_weighted(self, y_weighted: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sums rows already multiplied by their gate weights into tokens (fp32): y_TD [T, D]."""
        ones = torch.ones_like(handle.weights)
        return ops.unpermute(y_weighted, handle.token_idx, ones, handle.num_tokens, self.backend)

    def combine(self, y_sorted: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Weighted sum of the expert outputs back into tokens (accumulated in fp32).

        Args:
            y_sorted: [N, D] expert outputs in dispatch order.
            handle: token_idx [N] and weights [N] from dispatch (weight 0 for padding rows).
        Returns:
            y_TD [T, D].
        """
        return ops.unpermute(y_sorted, handle.token_idx, handle.weights, handle.num_tokens, self.backend)
