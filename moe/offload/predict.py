"""Side-effect-free router evaluation: probabilities and top-k of a router on any hidden state.

Used to score the current layer (predictive eviction) and to apply later layers' routers to
the current hidden state (prefetch). Shape legend: T tokens, D dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.routing.aux_free import AuxFreeRouter, group_limited_topk
from moe.routing.topk import TopKRouter


@torch.no_grad()
def route(router: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probs [T, E] fp32, ids [T, K]) as `router` would choose for x_TD, or None for routers it cannot
    evaluate without side effects (recurrent, expert choice)."""
    if isinstance(router, TopKRouter):
        probs = F.softmax(x_TD.float() @ router.weight.float().t(), dim=-1)
        return probs, probs.topk(router.top_k, dim=-1).indices
    if isinstance(router, AuxFreeRouter):
        cfg = router.config
        logits = x_TD.float() @ router.weight.float().t()
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else F.softmax(logits, dim=-1)
        ids = group_limited_topk(
            scores + router.e_score_correction_bias.float(), router.top_k, cfg.n_group, cfg.topk_group
        )
        return scores / scores.sum(-1, keepdim=True).clamp(min=1e-20), ids
    return None


def votes(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """[E] confidence that each expert is needed: mean over tokens of its probability where it is in
    the token's top-k, 0 elsewhere (0 for an expert no token picks). On the input's device."""
    picked = torch.zeros_like(probs_TE).scatter_(1, ids_TK.clamp(min=0), 1.0) * (ids_TK >= 0).any(1, keepdim=True)
    return (probs_TE * picked).mean(0)
