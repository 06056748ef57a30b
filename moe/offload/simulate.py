"""Replays a Trace through the cache engine: hit rates per policy, Belady, and baselines.

Capacities are in experts (every expert counts one unit), per layer for scope="layer" and in
all for scope="global" (capacity * num_layers, the same total).
"""

from __future__ import annotations

import torch

from moe.offload.cache import CacheStats, Residency
from moe.offload.engine import MIN_CONFIDENCE, CacheEngine
from moe.offload.policies import Belady, Policy, make_policy
from moe.offload.trace import Trace

__all__ = ["simulate", "shuffled", "iid_hit_rate"]


def simulate(
    trace: Trace,
    policy: str,
    capacity: int,
    scope: str = "layer",
    lookahead: int | None = None,
    max_prefetch: int | None = None,
    min_confidence: float = MIN_CONFIDENCE,
) -> CacheStats:
    """Hit/transfer counters of `policy` on `trace` with `capacity` experts per layer.

    Args:
        trace: the routing trace.
        policy: "lru" | "lfu" | "predictive" | "belady".
        capacity: experts per layer (scope="global": capacity * num_layers in one pool).
        scope: "layer" or "global".
        lookahead: layers ahead to prefetch (predictive; default: all the trace recorded).
        max_prefetch: cap on prefetches per predicted layer and step.
        min_confidence: the least forecast router probability worth a prefetch.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 expert per layer, got {capacity}")
    pol: Policy = Belady(trace.requests()) if policy == "belady" else make_policy(policy)
    budget = capacity * trace.num_layers
    res = Residency(budget, pol, trace.num_layers, scope)
    engine = CacheEngine(res, lambda layer: 1, max_prefetch=max_prefetch, min_confidence=min_confidence)
    depth = trace.lookahead if lookahead is None else min(lookahead, trace.lookahead)
    for s in range(trace.num_steps):
        layer = int(trace.layer_S[s])
        probs = trace.probs_SE[s] if trace.probs_SE is not None else None
        ahead = []
        if trace.ahead_SAE is not None:
            for j in range(depth):
                if layer + j + 1 < trace.num_layers:
                    ahead.append((layer + j + 1, trace.ahead_SAE[s, j]))
        for _ in engine.step(layer, trace.needed(s), probs, ahead):
            pass
    return res.stats


def shuffled(trace: Trace, seed: int = 0) -> Trace:
    """The same steps with each layer's steps in random order: same popularity, no temporal reuse."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(trace.num_steps)
    for layer in range(trace.num_layers):
        idx = (trace.layer_S == layer).nonzero().flatten()
        order[idx] = idx[torch.randperm(idx.numel(), generator=gen)]
    return Trace(
        trace.num_layers,
        trace.num_experts,
        trace.layer_S,
        trace.experts_SM[order],
        None if trace.probs_SE is None else trace.probs_SE[order],
        None,
        trace.expert_bytes,
        trace.source + " (shuffled)",
    )


def iid_hit_rate(trace: Trace, capacity: int) -> float:
    """i.i.d. baseline: LRU on the trace with each layer's steps shuffled (no temporal locality)."""
    return simulate(shuffled(trace), "lru", capacity).hit_rate
