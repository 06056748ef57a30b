"""One layer step of the expert cache: hits, misses, CPU misses and prefetches, in a fixed order.

The live runtime and the trace simulator both drive CacheEngine.step, so a recorded run replays
to the same counters. Order within a step (layer l, the experts its tokens chose):
    1. the policy observes the router probabilities and is touched by every requested expert
       (ascending id, so Belady can precompute positions);
    2. requested experts are pinned; prefetched-but-unrequested experts of layer l are demoted;
    3. prefetches for layers l+1..l+A start (predictive policy only), evicting only residents
       the policy ranks below the prediction;
    4. resident experts are computed, then misses one at a time (copy, or compute on the CPU);
       an expert is unpinned once computed, so even a one-expert-per-layer cache streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moe.offload.cache import Residency
from moe.offload.policies import Key, Predictive

__all__ = ["MIN_CONFIDENCE", "CacheEngine", "link_budget"]

# A guess is prefetched only when the forecast gives it at least this router probability. A wrong
# guess costs its copy and evicts an expert that may be needed again; below ~0.2 the guesses that
# ran on the decode timeline were wrong often enough to move more bytes than LRU (hit rate below
# LRU's) for a few percent of ms/token. The sweep behind the value: BENCHMARKS.md, issue 15.
MIN_CONFIDENCE = 0.2

# fetch(key, prefetch): start copying key to the device; prefetch=False for a demand miss.
Fetch = Callable[[Key, bool], None]


def link_budget(window_s: float, backlog_s: float, copy_s: float, streams: int = 1) -> int:
    """Prefetch copies that fit in the link's idle time before the next layer's demand copies.

    Args:
        window_s: time until the next layer's routing is known (its demand copies start then).
        backlog_s: copy time already queued or running on the link.
        copy_s: one expert's copy.
        streams: copy streams that run at once.
    A guess whose copy is still running when the next layer needs other experts delays them, so
    only what fits in the window goes (the decode timeline measures why: BENCHMARKS.md).
    """
    if copy_s <= 0:
        return 1 << 30
    return int(max(window_s - backlog_s, 0.0) / copy_s) * streams


def _noop(key: Key, prefetch: bool) -> None:
    return None


class CacheEngine:
    """Drives a Residency through layer steps.

    Args:
        residency: budgets, residents, stats and the policy.
        expert_bytes: bytes of one expert of a layer.
        fetch: starts copying key to the device (runtime) or nothing (simulator); told whether
            the copy is a prefetch, so demand copies need not queue behind prefetches.
        max_prefetch: at most this many prefetches per predicted layer and step.
        prefetch_budget: how many prefetch copies the link can take now without delaying the
            copies of experts known to be needed (the copies that fit in the link's idle time
            before the next layer's demand); None: no limit.
        admit_cpu_misses: asked after each miss computed on the CPU whether to also copy that
            expert in, as a prefetch, now (e.g. while the link is idle); None: never.
        min_confidence: the least forecast router probability worth a prefetch (a floor under
            the per-layer threshold that adapts to each layer's prefetch precision).
    """

    def __init__(
        self,
        residency: Residency,
        expert_bytes: Callable[[int], int],
        fetch: Fetch = _noop,
        max_prefetch: int | None = None,
        prefetch_budget: Callable[[], int] | None = None,
        admit_cpu_misses: Callable[[], bool] | None = None,
        min_confidence: float = MIN_CONFIDENCE,
    ) -> None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be a router probability in [0, 1], got {min_confidence}")
        self.residency, self.expert_bytes, self.fetch = residency, expert_bytes, fetch
        self.max_prefetch = max_prefetch
        self.prefetch_budget = prefetch_budget  # None: no limit from the link
        self.admit_cpu_misses = admit_cpu_misses
        self.min_confidence = min_confidence
        self.threshold: dict[int, float] = {}  # layer -> min confidence to prefetch (adapts to precision)
        self.pending: dict[int, set[int]] = {}  # layer -> experts prefetched for its next step

    def step(
        self,
        layer: int,
        needed: list[int],
        probs_E: torch.Tensor | None = None,
        lookahead: list[tuple[int, torch.Tensor]] | None = None,
        on_cpu: Callable[[Key], bool] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yields (expert, "device" | "cpu") in compute order; resume the generator after computing each.

        Args:
            layer: MoE layer ordinal.
            needed: experts with tokens at this step.
            probs_E: [E] mean router probabilities of the step's tokens (predictive policy).
            lookahead: (later layer, confidence [E]) predictions from that layer's router applied to
                the current hidden state (moe.offload.predict.votes; 0 = not predicted).
            on_cpu: decides per miss whether to compute where the expert lives instead of copying.
        """
        res, policy = self.residency, self.residency.policy
        stats = res.stats
        keys = [(layer, e) for e in sorted(needed)]
        policy.observe(layer, probs_E)
        for key in keys:
            policy.touch(key)
        stats.requests += len(keys)
        self._correct(layer, set(needed))
        res.pinned.update(keys)
        if lookahead and isinstance(policy, Predictive):
            budget = None if self.prefetch_budget is None else self.prefetch_budget()
            for target, votes_E in lookahead:
                if budget is not None and budget <= 0:
                    break
                budget = self._prefetch(target, votes_E, budget)
        hits = [k for k in keys if k in res]
        misses = [k for k in keys if k not in res]
        try:
            for key in hits:
                stats.hits += 1
                if key in res.prefetched:
                    stats.prefetch_hits += 1
                    res.prefetched.discard(key)
                yield key[1], "device"
                res.pinned.discard(key)
            for key in misses:
                if on_cpu is not None and on_cpu(key):
                    stats.cpu_misses += 1
                    yield key[1], "cpu"
                    self._admit_in_background(key)
                else:
                    nbytes = self.expert_bytes(layer)
                    res.pinned.discard(key)
                    if not res.make_room(key, nbytes):
                        raise RuntimeError(f"no evictable expert for {key}: pinned {sorted(res.pinned)}")
                    res.insert(key, nbytes)
                    stats.copies += 1
                    stats.bytes_moved += nbytes
                    self._fetch(key, False)
                    res.pinned.add(key)
                    yield key[1], "device"
                res.pinned.discard(key)
        finally:
            res.pinned.difference_update(keys)

    def _admit_in_background(self, key: Key) -> None:
        """After a miss computed on the CPU, copy the expert in as a prefetch when admit_cpu_misses
        says so and the policy values it above an eviction victim: a CPU miss that never enters
        the cache would be paid again at every later use."""
        if self.admit_cpu_misses is None or not self.admit_cpu_misses():
            return
        self.start_prefetch(key, floor=self.residency.policy.rank(key))

    def start_prefetch(self, key: Key, floor: tuple[float, ...]) -> bool:
        """Copies key in as a prefetch, evicting only residents the policy ranks below `floor`.

        Returns:
            False when key is resident already, larger than its pool, or no such room exists.
        """
        res, nbytes = self.residency, self.expert_bytes(key[0])
        if key in res or nbytes > res.budget_of(key) or not res.make_room(key, nbytes, floor=floor):
            return False
        res.insert(key, nbytes, prefetched=True)
        res.stats.prefetches += 1
        res.stats.bytes_moved += nbytes
        self._fetch(key, True)
        return True

    def _fetch(self, key: Key, prefetch: bool) -> None:
        try:
            self.fetch(key, prefetch)
        except BaseException:
            self.residency.evict(key)  # not resident after all (e.g. out of device memory)
            raise

    def _correct(self, layer: int, used: set[int]) -> None:
        """Misprediction feedback: demote unused prefetches; raise the layer's confidence threshold
        when fewer than half of its prefetches were used, lower it when most were."""
        prefetched = self.pending.pop(layer, None)
        if not prefetched:
            # Nothing was prefetched: ease the threshold, or a run of misses could raise it past
            # every possible vote (votes are probabilities) and switch prefetching off for good.
            if layer in self.threshold:
                self.threshold[layer] *= 0.9
            return
        policy = self.residency.policy
        for e in prefetched - used:
            if (layer, e) in self.residency.prefetched and isinstance(policy, Predictive):
                policy.demote((layer, e))
        precision = len(prefetched & used) / len(prefetched)
        thr = self.threshold.get(layer, 0.0)
        self.threshold[layer] = thr * 1.2 + 0.005 if precision < 0.5 else thr * 0.9

    def _prefetch(self, layer: int, votes_E: torch.Tensor, budget: int | None = None) -> int | None:
        """Prefetches layer's most confident experts; returns what is left of `budget`."""
        res, policy = self.residency, self.residency.policy
        assert isinstance(policy, Predictive)
        # Python floats: indexing a tensor element by element costs ~1 us each, per step.
        votes = votes_E.float().cpu().tolist()
        thr = max(self.threshold.get(layer, 0.0), self.min_confidence)
        order = sorted(range(len(votes)), key=lambda e: -votes[e])  # stable: ties by expert id
        # Residents are skipped before the caps: a resident guess costs no copy, so it must not
        # use up the link's budget that a missing expert could have had.
        candidates = [e for e in order if votes[e] > 0 and votes[e] >= thr and (layer, e) not in res]
        if self.max_prefetch is not None:
            candidates = candidates[: self.max_prefetch]
        if budget is not None:
            candidates = candidates[:budget]
        inserted: list[Key] = []
        try:
            for e in candidates:
                key = (layer, e)
                # Evict only what the policy values less than this prediction (never a pinned
                # expert, and so never an earlier, more confident prefetch of this call).
                if self.start_prefetch(key, floor=(1.0, votes[e], float("inf"))):
                    res.pinned.add(key)
                    inserted.append(key)
                    self.pending.setdefault(layer, set()).add(e)
        finally:
            res.pinned.difference_update(inserted)
        return None if budget is None else budget - len(inserted)
