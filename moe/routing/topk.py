"""Top-k softmax router (Switch / GShard / Mixtral / Qwen-MoE / OLMoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import TopKConfig
from moe.routing.base import Router, Routing
from moe.routing.losses import balance_loss, z_loss

__all__ = ["TopKRouter", "softmax_topk", "router_losses"]


def softmax_topk(
    logits_TE: torch.Tensor, top_k: int, norm_topk_prob: bool, probs_given: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs [T, E], weights [T, K], ids [T, K]) from fp32 logits (or, probs_given, from the
    softmax of them), renormalised if asked."""
    probs = logits_TE if probs_given else F.softmax(logits_TE, dim=-1)
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
    """The weighted aux losses (balance, z-loss) of one routing, by name."""
    losses = {}
    if aux_loss_coef > 0:
        losses["balance"] = aux_loss_coef * balance_loss(probs_TE, ids_TK, token_mask)
    if z_loss_coef > 0:
        losses["z"] = z_loss_coef * z_loss(logits_TE, token_mask)
    return losses


class TopKRouter(Router):
    """logits = x W^T (+ b) (W [E, D]; b [E] with config.bias); p = softmax; (w, ids) = topk(p, k).

    The logits come from fp32 copies of x and W, or in x's dtype with config.routing_dtype="model"
    (Hugging Face's half-precision routing, bit for bit); everything after them runs in fp32.
    """

    bias: torch.Tensor | None

    def __init__(self, dim: int, num_experts: int, top_k: int, config: TopKConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or TopKConfig()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if self.config.bias else None

    def _logits(self, x_TD: torch.Tensor, jitter: bool) -> torch.Tensor:
        """[T, E] logits, fp32 or (routing_dtype="model") in x's dtype."""
        in_model_dtype = self.config.routing_dtype == "model"
        x = x_TD if in_model_dtype else x_TD.float()  # default: gate in fp32 for stable load balancing
        if jitter and self.training and self.config.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.config.jitter, 1 + self.config.jitter)
        if in_model_dtype:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        logits = x @ self.weight.float().t()
        return logits if self.bias is None else logits + self.bias.float()

    def _route(self, logits_TE: torch.Tensor, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [T, E] fp32, weights [T, K] fp32, ids [T, K]) from logits of any dtype."""
        cfg = self.config
        probs = F.softmax(logits_TE.float(), dim=-1)
        if cfg.softmax_after_topk:
            top, ids = torch.topk(logits_TE, self.top_k, dim=-1)
            weights = F.softmax(top.float(), dim=-1)
        else:
            _, weights, ids = softmax_topk(probs, self.top_k, cfg.norm_topk_prob, probs_given=True)
        if cfg.round_weights and cfg.routing_dtype == "model":
            weights = weights.to(x_dtype).float()
        return probs, weights, ids

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """Routing of x_TD [T, D]: top-k ids [T, K] and weights [T, K] of the softmax, with aux losses."""
        logits = self._logits(x_TD, jitter=True)
        probs, weights, ids = self._route(logits, x_TD.dtype)
        losses = router_losses(
            logits.float(), probs, ids, self.config.aux_loss_coef, self.config.z_loss_coef, token_mask
        )
        return Routing(ids, weights, losses, probs, x_TD.shape[0] * self.top_k)

    @classmethod
    @torch.no_grad()
    def probe_many(cls, routers: list[Router], x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked probes with one softmax and one top-k over all A routers: the op count does not
        grow with A (at batch 1 a decode step pays per op, not for the math)."""
        if not all(
            isinstance(r, TopKRouter) and type(r).probe is TopKRouter.probe and r._plain() for r in routers
        ):  # other math: one by one
            return super().probe_many(routers, x_TD)
        a, e, k = len(routers), routers[0].num_experts, routers[0].top_k
        x = x_TD.float()
        logits = torch.cat([x @ r.weight.float().t() for r in routers], dim=-1)  # type: ignore[operator]
        probs_TAE = F.softmax(logits.view(-1, a, e), dim=-1)
        return probs_TAE, probs_TAE.topk(k, dim=-1).indices

    def _plain(self) -> bool:
        """fp32 logits without bias, top-k of the softmax: the math probe_many batches."""
        cfg = self.config
        return cfg.routing_dtype == "float32" and self.bias is None and not cfg.softmax_after_topk

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E] fp32, ids [T, K]) of forward in eval mode (no jitter); no side effects."""
        if self._plain():
            probs, _, ids = softmax_topk(x_TD.float() @ self.weight.float().t(), self.top_k, False)
            return probs, ids
        probs, _, ids = self._route(self._logits(x_TD, jitter=False), x_TD.dtype)
        return probs, ids
