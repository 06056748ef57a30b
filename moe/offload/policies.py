"""Eviction policies of the expert cache: LRU, LFU, predictive, and the offline Belady oracle.

A policy only ranks resident experts; moe.offload.cache.Residency owns budgets and residency.
Keys are (layer, expert) pairs. Shape legend: E experts of one layer.

Every policy sees the same calls, in request order:
    observe(layer, probs_E)   router probabilities of the layer's current step (may be None)
    touch(key)                key was requested (hit or miss)
    admit(key) / forget(key)  key entered / left the cache
    victim(candidates)        which of these residents to evict
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["Key", "POLICIES", "Policy", "LRU", "LFU", "Predictive", "Belady", "make_policy"]


Key = tuple[int, int]

POLICIES = ("lru", "lfu", "predictive", "belady")


class Policy:
    """Base class: ranks residents; lower rank = evicted first."""

    name = "base"
    prefetches = False

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}

    def observe(self, layer: int, probs_E: torch.Tensor | None) -> None:
        """Router probabilities [E] (mean over the step's tokens) of `layer`, before its requests."""

    def touch(self, key: Key) -> None:
        """Records a request of `key` = (layer, expert), hit or miss."""
        self.clock += 1
        self.last_use[key] = self.clock

    def admit(self, key: Key) -> None:
        """Records that `key` entered the cache."""
        self.last_use.setdefault(key, self.clock)

    def forget(self, key: Key) -> None:
        """key was evicted; policies that keep history across evictions keep it."""

    def rank(self, key: Key) -> tuple[float, ...]:
        """Eviction rank of a resident `key`: lower is evicted first (here: last use, i.e. LRU)."""
        return (float(self.last_use.get(key, -1)),)

    def victim(self, candidates: Iterable[Key]) -> Key:
        """The candidate with the lowest rank: the one to evict."""
        return min(candidates, key=self.rank)


class LRU(Policy):
    """Evict the least recently requested expert."""

    name = "lru"


class LFU(Policy):
    """Evict the least frequently requested expert; counts persist across evictions, ties by recency."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        """Records a request and counts it."""
        super().touch(key)
        self.count[key] = self.count.get(key, 0) + 1

    def rank(self, key: Key) -> tuple[float, ...]:
        """(request count, last use): the least frequently used goes first, ties by recency."""
        return (float(self.count.get(key, 0)), float(self.last_use.get(key, -1)))


class Predictive(Policy):
    """Ranks experts by a decayed average of their router probability (plus request frequency).

    The router's full distribution at the current step is a soft forecast of the next steps'
    choices (consecutive tokens have correlated hidden states), so experts the router still
    favours are kept even when they were not in this step's top-k. The runtime additionally
    prefetches the next `lookahead` layers' experts by applying their routers to the current
    hidden state (see moe.offload.runtime); a prefetched expert that was not used is demoted to
    the front of the eviction order (the correction on misprediction).

    Args:
        decay: weight of the history in the per-expert score (0 = only the current step).
        request_weight: extra score for an expert actually requested (top-k) at a step.
    """

    name = "predictive"
    prefetches = True

    def __init__(self, decay: float = 0.0, request_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.request_weight = decay, request_weight
        self.score: dict[int, list[float]] = {}  # layer -> [E] decayed score
        self.demoted: set[Key] = set()

    def observe(self, layer: int, probs_E: torch.Tensor | None) -> None:
        """Folds one step's router probabilities of `layer` into its decayed scores.

        Args:
            layer: the MoE layer.
            probs_E: [E] router probabilities (predicted or observed), or None (nothing to learn).
        """
        if probs_E is None:
            return
        probs = probs_E.detach().float().cpu().tolist()
        prev = self.score.get(layer)
        d = self.decay
        self.score[layer] = probs if prev is None else [d * a + (1 - d) * b for a, b in zip(prev, probs, strict=True)]

    def touch(self, key: Key) -> None:
        """Records a request; a requested expert's score gets a bonus and is no longer demoted."""
        super().touch(key)
        self.demoted.discard(key)
        layer, e = key
        if layer in self.score:
            self.score[layer][e] += (1 - self.decay) * self.request_weight

    def demote(self, key: Key) -> None:
        """key was prefetched and not used: evict it before anything else."""
        self.demoted.add(key)

    def forget(self, key: Key) -> None:
        """Records that `key` left the cache."""
        self.demoted.discard(key)

    def value(self, key: Key) -> float:
        """The decayed router score of `key` = (layer, expert) (0.0 for a layer not seen yet)."""
        layer, e = key
        s = self.score.get(layer)
        return s[e] if s is not None else 0.0

    def rank(self, key: Key) -> tuple[float, ...]:
        """(not demoted, score, last use): demoted guesses go first, then the lowest scores."""
        return (0.0 if key in self.demoted else 1.0, self.value(key), float(self.last_use.get(key, -1)))


class Belady(Policy):
    """Offline MIN: evict the resident expert whose next request is farthest in the future.

    Args:
        requests: the whole request sequence, in the order the cache will see touch() calls.
    """

    name = "belady"

    def __init__(self, requests: Sequence[Key]) -> None:
        super().__init__()
        self.uses: dict[Key, list[int]] = {}
        for i, key in enumerate(requests):
            self.uses.setdefault(key, []).append(i)
        self.pos: dict[Key, int] = {}  # index into uses[key] of the next use
        self.position = 0  # number of touches so far

    def touch(self, key: Key) -> None:
        """Advances along the trace; raises ValueError when the request is not the trace's next one."""
        super().touch(key)
        uses = self.uses.get(key)
        if uses is None or self.pos.get(key, 0) >= len(uses) or uses[self.pos.get(key, 0)] != self.position:
            raise ValueError(f"Belady saw request {key} at position {self.position}, which its trace does not have")
        self.pos[key] = self.pos.get(key, 0) + 1
        self.position += 1

    def next_use(self, key: Key) -> int:
        """Position of the next request of `key` in the trace (a huge number when never again)."""
        uses = self.uses.get(key, [])
        i = self.pos.get(key, 0)
        return uses[i] if i < len(uses) else 1 << 62

    def rank(self, key: Key) -> tuple[float, ...]:
        """Minus the next use: the expert needed furthest in the future goes first."""
        return (-float(self.next_use(key)),)


def make_policy(name: str, **options: float) -> Policy:
    """An online policy by name: "lru", "lfu" or "predictive" (Belady needs the future: use Belady(requests))."""
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "predictive":
        return Predictive(**options)
    if name == "belady":
        raise ValueError("belady is offline: build Belady(requests) from a trace (moe.offload.simulate does)")
    raise ValueError(f"unknown policy {name!r}; choose one of {POLICIES}")
