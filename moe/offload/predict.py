"""Side-effect-free router evaluation: probabilities and top-k of a router on any hidden state.

Used to score the current layer (predictive eviction) and to apply later layers' routers to
the current hidden state (prefetch). Shape legend: T tokens, D dim, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

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
            scores + router.e_score_correction_bias.float(), router.top_k, cfg.n_group, cfg.topk_group, cfg.group_score
        )
        return scores / scores.sum(-1, keepdim=True).clamp(min=1e-20), ids
    return None


def votes(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """[E] confidence that each expert is needed: mean over tokens of its probability where it is in
    the token's top-k, 0 elsewhere (0 for an expert no token picks). On the input's device."""
    picked = torch.zeros_like(probs_TE).scatter_(1, ids_TK.clamp(min=0), 1.0) * (ids_TK >= 0).any(1, keepdim=True)
    return (probs_TE * picked).mean(0)


@torch.no_grad()
def forecast(
    routers: Sequence[nn.Module], layer: int, x_TD: torch.Tensor, lookahead: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
    """What `layer`'s input x_TD says about this layer and the next `lookahead` ones, on the host.

    Returns:
        (probs_E, picked_E, ahead): the mean router probabilities of `layer`'s own router and the
        tokens it sends to each expert (both None when that router cannot be evaluated, see route),
        and (later layer, votes [E]) for layers layer+1..layer+lookahead whose routers can.
        Everything comes back in one device-to-host read: each read is a host sync, and at batch 1
        every sync stalls the overlap of expert copies with compute.
    """
    chain = routers[layer : layer + lookahead + 1]
    topk = [r for r in chain if isinstance(r, TopKRouter)]
    if len(topk) == len(chain) and len({(r.weight.shape, r.top_k) for r in topk}) == 1:
        return _forecast_topk(topk, layer, x_TD)
    own = route(routers[layer], x_TD)
    rows: list[torch.Tensor] = []
    if own is not None:
        probs_TE, ids_TK = own
        ids = ids_TK.reshape(-1)
        # scatter_add, not bincount of ids[ids >= 0]: boolean indexing would sync with the host.
        picked = probs_TE.new_zeros(probs_TE.shape[1]).scatter_add_(0, ids.clamp(min=0), (ids >= 0).float())
        rows += [probs_TE.mean(0), picked]
    targets = []
    for target in range(layer + 1, min(layer + lookahead + 1, len(routers))):
        pred = route(routers[target], x_TD)
        if pred is not None:
            targets.append(target)
            rows.append(votes(*pred).float())
    if not rows:
        return None, None, []
    host = list(torch.cat(rows).cpu().split([r.shape[0] for r in rows]))
    probs, picked_host = (host.pop(0), host.pop(0)) if own is not None else (None, None)
    return probs, picked_host, list(zip(targets, host, strict=True))


def _forecast_topk(
    chain: Sequence[TopKRouter], layer: int, x_TD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """forecast() for top-k routers of one shape: batched over the routers, so that the op count
    does not grow with the lookahead (at batch 1 a decode step pays per op, not for the math)."""
    a, e, k = len(chain), chain[0].num_experts, chain[0].top_k
    x = x_TD.float()
    logits = torch.cat([x @ r.weight.float().t() for r in chain], dim=-1)  # [T, A * E]; no weight copies
    probs_TAE = F.softmax(logits.view(-1, a, e), dim=-1)
    picked_TAE = torch.zeros_like(probs_TAE).scatter_(-1, probs_TAE.topk(k, dim=-1).indices, 1.0)
    rows = [probs_TAE[:, 0].mean(0), picked_TAE[:, 0].sum(0)]
    if a > 1:
        rows.append((probs_TAE[:, 1:] * picked_TAE[:, 1:]).mean(0).flatten())
    host = torch.cat(rows).cpu().view(a + 1, e)
    return host[0], host[1], [(layer + j, host[j + 1]) for j in range(1, a)]
