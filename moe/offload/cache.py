"""Which experts are resident on the device, under byte budgets (per layer or one global pool).

Residency does bookkeeping only (the runtime attaches buffers through on_evict); the trace
simulator uses the same class, so simulated and live hit rates follow the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moe.offload.policies import Key, Policy

__all__ = ["BudgetError", "CacheStats", "Residency"]


class BudgetError(ValueError):
    """The cache cannot hold the expert even after evicting every unpinned resident."""


@dataclass
class CacheStats:
    """Counters of one run.

    requests: expert uses (one per (step, layer, expert) with tokens).
    hits: requests served by a resident expert that was already there or prefetched.
    prefetch_hits: the subset of hits whose expert a prefetch brought in.
    copies: demand copies (misses copied to the device); prefetches: prefetch copies.
    cpu_misses: misses computed where the expert lives (no copy).
    wasted_prefetches: prefetched experts evicted before any use.
    bytes_moved: bytes copied to the device (demand + prefetch).
    """

    requests: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    copies: int = 0
    prefetches: int = 0
    cpu_misses: int = 0
    wasted_prefetches: int = 0
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        """1 - copies / requests: the fraction of requests that needed no transfer of their own.

        Prefetches count as transfers, so this is what bounds bytes moved and what Belady's MIN
        bounds from above for every policy, prefetching or not.
        """
        transfers = self.copies + self.prefetches + self.cpu_misses
        return 1.0 - transfers / self.requests if self.requests else 0.0

    @property
    def ready_rate(self) -> float:
        """Fraction of requests whose expert was on the device when asked for (no stall)."""
        return self.hits / self.requests if self.requests else 0.0


class Residency:
    """Resident experts and their bytes, per budget pool.

    Args:
        budget_bytes: device bytes for experts in all.
        policy: ranks residents for eviction.
        num_layers: MoE layers (per-layer scope splits the budget evenly over them).
        scope: "layer" (each layer has budget_bytes // num_layers) or "global" (one pool).
        on_evict: called with each evicted key (the runtime frees its buffer there).
        layer_shares: per-layer scope only: split the budget in proportion to these weights
            instead of evenly (the runtime passes each layer's expert count x expert bytes, so a
            pyramid's wide layers get the larger pools). None = evenly.
    """

    def __init__(
        self,
        budget_bytes: int,
        policy: Policy,
        num_layers: int,
        scope: str = "layer",
        on_evict: Callable[[Key], None] | None = None,
        layer_shares: list[float] | None = None,
    ) -> None:
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.budget_bytes, self.policy, self.num_layers, self.scope = int(budget_bytes), policy, num_layers, scope
        self.pool_budget = self.budget_bytes // num_layers if scope == "layer" else self.budget_bytes
        self.pool_budgets: dict[int, int] = {}  # per-layer pools sized by layer_shares (else pool_budget)
        if layer_shares is not None and scope == "layer":
            if len(layer_shares) != num_layers or not all(w > 0 for w in layer_shares):
                raise ValueError(f"layer_shares must be {num_layers} positive weights, got {layer_shares!r}")
            total = float(sum(layer_shares))
            self.pool_budgets = {i: int(self.budget_bytes * w / total) for i, w in enumerate(layer_shares)}
            self.pool_budget = min(self.pool_budgets.values())
        self.on_evict = on_evict
        self.size: dict[Key, int] = {}
        self.members: dict[int, dict[Key, None]] = {}  # pool -> its residents, in insertion order
        self.used: dict[int, int] = {}  # pool -> bytes
        self.pinned: set[Key] = set()
        self.prefetched: set[Key] = set()  # resident, brought by prefetch, not used yet
        self.peak_bytes = 0
        self.stats = CacheStats()

    def pool(self, key: Key) -> int:
        """The budget pool of `key` = (layer, expert): its layer with per-layer budgets, else 0."""
        return key[0] if self.scope == "layer" else 0

    def budget_of(self, key: Key) -> int:
        """Bytes of the pool `key` belongs to."""
        return self.pool_budgets.get(self.pool(key), self.pool_budget)

    @property
    def used_bytes(self) -> int:
        """Bytes held by resident experts, over all pools."""
        return sum(self.used.values())

    def __contains__(self, key: Key) -> bool:
        return key in self.size

    def check_fits(self, nbytes: int, what: str, key: Key | None = None) -> None:
        """Raises BudgetError when one expert of `nbytes` cannot fit in its empty pool (key's layer)."""
        budget = self.pool_budget if key is None else self.budget_of(key)
        if nbytes > budget:
            if self.pool_budgets:
                per = f"for its layer (the budget split over MoE layers by expert count x size: {self.pool_budgets})"
                need = f"a larger cache budget (layer {self.pool(key) if key else '?'} gets {budget} bytes of it)"
            else:
                per = "per layer (budget / MoE layers)" if self.scope == "layer" else "in all"
                total = nbytes * (self.num_layers if self.scope == "layer" else 1)
                need = f"the cache budget to at least {total} bytes (one expert per layer)"
            raise BudgetError(
                f"{what} needs {nbytes} bytes but the expert cache has {budget} bytes {per}; raise {need}"
            )

    def make_room(self, key: Key, nbytes: int, floor: tuple[float, ...] | None = None) -> bool:
        """Evicts unpinned residents of key's pool until nbytes fit.

        Args:
            floor: only evict residents the policy ranks below this (prefetches must not push
                out experts the policy values more). None = evict whatever the policy picks.

        Returns:
            False (nothing evicted beyond what fits) when no permitted victim is left.
        """
        self.check_fits(nbytes, f"expert {key}", key)
        pool = self.pool(key)
        budget = self.budget_of(key)
        if floor is not None:
            # All or nothing: evict only if the residents ranked below the floor free enough
            # (experts of different sizes share a global pool: a partial eviction would be waste).
            need = self.used.get(pool, 0) + nbytes - budget
            below = [k for k in self.members.get(pool, ()) if k not in self.pinned and self.policy.rank(k) < floor]
            if sum(self.size[k] for k in below) < need:
                return False
        while self.used.get(pool, 0) + nbytes > budget:
            candidates = [k for k in self.members.get(pool, ()) if k not in self.pinned]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            if floor is not None and self.policy.rank(victim) >= floor:
                return False
            self.evict(victim)
        return True

    def insert(self, key: Key, nbytes: int, prefetched: bool = False) -> None:
        """Marks `key` resident with `nbytes` (the caller made room first; BudgetError otherwise).

        Args:
            key: (layer, expert).
            nbytes: the expert's size on the device.
            prefetched: admitted by a prefetch, not a demand miss (counted as wasted if evicted unused).
        """
        pool = self.pool(key)
        if self.used.get(pool, 0) + nbytes > self.budget_of(key):
            raise BudgetError(f"insert of {key} would exceed the budget: call make_room first")
        self.size[key] = nbytes
        self.members.setdefault(pool, {})[key] = None
        self.used[pool] = self.used.get(pool, 0) + nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        if prefetched:
            self.prefetched.add(key)
        self.policy.admit(key)

    def evict(self, key: Key) -> None:
        """Drops `key` from the device tier, tells the policy and calls on_evict (if set)."""
        nbytes = self.size.pop(key)
        del self.members[self.pool(key)][key]
        self.used[self.pool(key)] -= nbytes
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.stats.wasted_prefetches += 1
        self.policy.forget(key)
        if self.on_evict is not None:
            self.on_evict(key)
