"""Side-effect-free router evaluation for the offload forecaster, through Router.probe.

Used to score the current layer (predictive eviction) and to apply later layers' routers to
the current hidden state (prefetch). The routers own the math (moe.routing: Router.probe);
this module only asks them. Shape legend: T tokens, D dim, E experts, K top-k, A routers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from moe.routing.base import Router

__all__ = ["route", "votes", "forecast"]

_warned: set[type] = set()


def _warn_no_probe(router: nn.Module, why: str) -> None:
    if type(router) not in _warned:
        _warned.add(type(router))
        warnings.warn(
            f"offload prediction: router {type(router).__name__} {why}, so its layer gets no prefetch or "
            "predictive score; implement moe.routing.Router.probe(x_TD) -> (probs [T, E], ids [T, K]) "
            "(side-effect free) to enable them",
            RuntimeWarning,
            stacklevel=3,
        )


def _standalone(router: nn.Module) -> bool:
    return isinstance(router, Router) and router.probe_standalone


@torch.no_grad()
def route(router: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probs [T, E] fp32, ids [T, K]) as `router` would choose for x_TD (Router.probe), or None for
    a router that cannot score a hidden state on its own: one whose probe reads state carried
    between layers (the recurrent router; probe_standalone False), or one without a probe (a
    RuntimeWarning, once per router class)."""
    if not isinstance(router, Router):
        _warn_no_probe(router, "is not a moe.routing.Router")
        return None
    if not router.probe_standalone:
        return None
    try:
        probs, ids = router.probe(x_TD)
    except NotImplementedError:
        _warn_no_probe(router, "does not implement probe")
        return None
    return probs.float(), ids


def votes(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """[E] confidence that each expert is needed: mean over tokens of its probability where it is in
    the token's top-k, 0 elsewhere (0 for an expert no token picks; -1 ids pick nothing). On the
    input's device."""
    return (probs_TE * _picked(ids_TK, probs_TE.shape[-1], probs_TE.dtype)).mean(0)


def _picked(ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., E] 1.0 where the slot ids [..., K] pick an expert (-1 slots pick nothing)."""
    out = torch.zeros(*ids.shape[:-1], num_experts, dtype=dtype, device=ids.device)
    return out.scatter_add_(-1, ids.clamp(min=0), (ids >= 0).to(dtype)).clamp_(max=1.0)


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
    first = routers[layer]
    chain = [r for r in routers[layer : layer + lookahead + 1] if type(r) is type(first) and isinstance(r, Router)]
    if (
        _standalone(first)
        and len(chain) == len(routers[layer : layer + lookahead + 1])
        and len({(r.num_experts, r.top_k) for r in chain}) == 1
    ):
        try:
            return _forecast_stacked(type(chain[0]).probe_many(chain, x_TD), layer)
        except NotImplementedError:
            pass  # no probe: route() below warns
    own = route(first, x_TD)
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


def _forecast_stacked(
    probed: tuple[torch.Tensor, torch.Tensor], layer: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """forecast() for routers of one class and shape, from their stacked probes (probs [T, A, E],
    ids [T, A, K]): a fixed number of ops whatever the lookahead."""
    probs_TAE, ids_TAK = probed
    probs_TAE = probs_TAE.float()
    a, e = probs_TAE.shape[1], probs_TAE.shape[2]
    picked_TAE = _picked(ids_TAK, e, probs_TAE.dtype)
    rows = [probs_TAE[:, 0].mean(0), picked_TAE[:, 0].sum(0)]
    if a > 1:
        rows.append((probs_TAE[:, 1:] * picked_TAE[:, 1:]).mean(0).flatten())
    host = torch.cat(rows).cpu().view(a + 1, e)
    return host[0], host[1], [(layer + j, host[j + 1]) for j in range(1, a)]
