"""Top-k softmax router (Switch / GShard / Mixtral / Qwen-MoE / OLMoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import TopKConfig
from moe.routing.base import Router, Routing
from moe.routing.losses import balance_loss, z_loss


def softmax_topk(
    logits_TE: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs [T, E], weights [T, K], ids [T, K]) from fp32 logits, renormalised if asked."""
    probs = F.softmax(logits_TE, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def router_losses(
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    aux_loss_coef: float,
    z_loss_coef: float,
    token_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    losses = {}
    if aux_loss_coef > 0:
        losses["balance"] = aux_loss_coef * balance_loss(probs_TE, ids_TK, token_mask)
    if z_loss_coef > 0:
        losses["z"] = z_loss_coef * z_loss(logits_TE, token_mask)
    return losses


class TopKRouter(Router):
    """logits = x W^T in fp32 (W [E, D], no bias); p = softmax; (w, ids) = topk(p, k)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, config: TopKConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or TopKConfig()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        x = x_TD.float()  # gate in fp32 for stable load balancing
        if self.training and self.config.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
        logits = x @ self.weight.float().t()
        probs, weights, ids = softmax_topk(logits, self.top_k, self.config.norm_topk_prob)
        losses = router_losses(logits, probs, ids, self.config.aux_loss_coef, self.config.z_loss_coef, token_mask)
        return Routing(ids, weights, losses, probs, x_TD.shape[0] * self.top_k)

    @classmethod
    @torch.no_grad()
    def probe_many(cls, routers: list[Router], x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked probes with one softmax and one top-k over all A routers: the op count does not
        grow with A (at batch 1 a decode step pays per op, not for the math)."""
        if not all(type(r).probe is TopKRouter.probe for r in routers):  # a subclass changed the math
            return super().probe_many(routers, x_TD)
        a, e, k = len(routers), routers[0].num_experts, routers[0].top_k
        x = x_TD.float()
        logits = torch.cat([x @ r.weight.float().t() for r in routers], dim=-1)  # type: ignore[operator]
        probs_TAE = F.softmax(logits.view(-1, a, e), dim=-1)
        return probs_TAE, probs_TAE.topk(k, dim=-1).indices

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E] fp32, ids [T, K]) of forward in eval mode (no jitter); no side effects."""
        probs, _, ids = softmax_topk(x_TD.float() @ self.weight.float().t(), self.top_k, False)
        return probs, ids
