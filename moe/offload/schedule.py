"""Which requests share a batched decode step: FIFO, or regrouped by predicted experts (ExpertFlow).

A batched decode step of an offloaded model needs the union of its tokens' experts on the device;
with top-k routing over 16 requests that union is most of a layer's experts. The regrouping
scheduler picks, from a pool of admitted requests, a batch whose predicted experts overlap, so a
step touches fewer distinct experts, while every admitted request still runs at least once every
max_wait + 1 steps (no starvation).

    queue = BatchQueue(num_requests, SchedulerConfig(kind="regroup", batch_size=16, max_wait=4))
    while not queue.done:
        queue.admit()                           # prefill the newly admitted requests
        batch = queue.next_batch(predicted)     # predicted[r]: set of (layer, expert) keys of request r
        ...run the step...; queue.finished(r) for the requests that stopped

Both the benchmark (benchmarks/offload_batched.py, on recorded traces) and the runtime
(moe.offload.batched.generate_batched) call this code. pick_batch is pure: it sees only the
candidates' predicted expert sets and how long each has waited.

The wait bound. A request that has waited w steps must run within max_wait - w more steps
(its deadline). Unit jobs on batch_size slots meet every deadline iff for every k >= 0 at most
batch_size * (k + 1) requests are due within k steps; pick_batch first takes, in deadline order,
as many requests as that condition needs this step (`_forced`), then fills the batch greedily.
The condition then holds again after the step, and holds at admission while the pool has at most
batch_size * (max_wait + 1) requests, which SchedulerConfig enforces: so no admitted request ever
waits more than max_wait steps (tests/test_offload_batched.py checks it on random workloads).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from moe.offload.policies import Key

__all__ = ["SCHEDULERS", "BatchQueue", "SchedulerConfig", "TokenRoutes", "pick_batch"]

SCHEDULERS = ("fifo", "regroup")
Kind = Literal["fifo", "regroup"]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """How a batched decode picks its requests.

    Attributes:
        kind: "fifo" (the first batch_size unfinished requests in input order; each runs every
            step until it stops) or "regroup" (the batch whose predicted experts overlap most).
        batch_size: requests per decode step (>= 1).
        max_wait: regroup: the most consecutive steps an admitted request may be left out (>= 0).
        pool_size: regroup: requests admitted at once (started, holding their KV cache), in input
            order; None = batch_size * (max_wait + 1), the most for which the wait bound can hold.
    """

    kind: Kind = "fifo"
    batch_size: int = 8
    max_wait: int = 4
    pool_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.kind!r}; choose one of {SCHEDULERS}")
        for name in ("batch_size", "max_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {self.max_wait}")
        if self.pool_size is not None:
            if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
                raise TypeError(f"pool_size must be an int or None, got {self.pool_size!r}")
            if not self.batch_size <= self.pool_size <= self.batch_size * (self.max_wait + 1):
                raise ValueError(
                    f"pool_size must be in [batch_size, batch_size * (max_wait + 1)] = [{self.batch_size}, "
                    f"{self.batch_size * (self.max_wait + 1)}] so the wait bound can hold, got {self.pool_size}"
                )

    @property
    def pool(self) -> int:
        """Requests admitted at once (FIFO: batch_size)."""
        if self.kind == "fifo":
            return self.batch_size
        return self.pool_size if self.pool_size is not None else self.batch_size * (self.max_wait + 1)


def _forced(waits: Sequence[int], batch_size: int, max_wait: int) -> list[int]:
    """Candidates that must run now so every deadline can still be met, in deadline order."""
    order = sorted(range(len(waits)), key=lambda i: (-waits[i], i))
    need = 0
    due = 0  # candidates whose deadline is within k steps
    for k in range(max_wait + 1):
        due = sum(1 for w in waits if max_wait - w <= k)
        need = max(need, due - batch_size * k)
    return order[: min(need, batch_size)]


def pick_batch(
    config: SchedulerConfig,
    predicted: Sequence[Collection[Key]],
    waits: Sequence[int],
) -> list[int]:
    """Indices of the candidates that form the next step's batch, ascending.

    Args:
        config: the scheduler.
        predicted: per candidate (admitted requests, in admission order), the (layer, expert) keys
            its next token is predicted to use.
        waits: per candidate, consecutive steps it has been left out.

    regroup: the candidates the wait bound forces in (longest-waiting first), then repeatedly the
    candidate adding the fewest keys not already in the batch (ties: the longer wait, then the
    earlier request). (Counting the previous step's experts as covered, likely cached, measured
    worse on the trained trace's timeline: 1.08-1.25x FIFO instead of 1.13-1.32x.)
    """
    n = len(predicted)
    if len(waits) != n:
        raise ValueError(f"predicted has {n} candidates, waits {len(waits)}")
    size = min(config.batch_size, n)
    if config.kind == "fifo":
        return list(range(size))
    chosen = _forced(waits, config.batch_size, config.max_wait)
    covered: set[Key] = set()
    for i in chosen:
        covered.update(predicted[i])
    rest = [i for i in range(n) if i not in set(chosen)]
    while len(chosen) < size:
        best = min(rest, key=lambda i: (sum(1 for k in predicted[i] if k not in covered), -waits[i], i))
        rest.remove(best)
        chosen.append(best)
        covered.update(predicted[best])
    return sorted(chosen)


class BatchQueue:
    """Admission, waits and the wait bound of one batched run over requests 0..n-1 (input order).

    Requests are admitted in input order while the pool has room; next_batch picks among the
    admitted, unfinished ones. max_wait_seen is the longest any request was left out.
    """

    def __init__(self, num_requests: int, config: SchedulerConfig) -> None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        self.config = config
        self.waiting = list(range(num_requests))  # not admitted yet, in input order
        self.active: list[int] = []  # admitted and unfinished, in admission order
        self.waits: dict[int, int] = {}
        self.max_wait_seen = 0
        self.steps = 0

    @property
    def done(self) -> bool:
        """Every request finished."""
        return not self.waiting and not self.active

    def admit(self) -> list[int]:
        """Admits waiting requests while the pool has room; returns the newly admitted (to prefill)."""
        new = []
        while self.waiting and len(self.active) < self.config.pool:
            r = self.waiting.pop(0)
            self.active.append(r)
            self.waits[r] = 0
            new.append(r)
        return new

    def next_batch(self, predicted: Mapping[int, Collection[Key]]) -> list[int]:
        """The request ids of the next decode step, in admission order, among the active ones (call
        admit() first); `predicted` maps each active request to its predicted keys (regroup only)."""
        if not self.active:
            raise ValueError("no active request: call admit() first, or every request has finished")
        sets = [predicted[r] for r in self.active] if self.config.kind == "regroup" else [()] * len(self.active)
        picked = pick_batch(self.config, sets, [self.waits[r] for r in self.active])
        batch = [self.active[i] for i in picked]
        chosen = set(batch)
        for r in self.active:
            self.waits[r] = 0 if r in chosen else self.waits[r] + 1
            self.max_wait_seen = max(self.max_wait_seen, self.waits[r])
        self.steps += 1
        return batch

    def finished(self, request: int) -> None:
        """Removes a request that stopped (its pool slot goes to the next waiting one)."""
        self.active.remove(request)
        del self.waits[request]


class TokenRoutes:
    """Predicts a token's experts from the routing seen so far for the same token id.

    A decode step feeds each request's newest token, whose id is known before the step; tokens
    of one id route alike (the embedding is the first hidden state). observe() counts, per token
    id and layer, the experts the routers chose; predict() returns per layer the most chosen
    ones (as many as the layer's top-k), or `fallback` for an id not seen yet. Learned online
    from the run itself: nothing of the future.
    """

    def __init__(self) -> None:
        self.counts: dict[int, dict[Key, int]] = {}
        self.top_k: dict[int, int] = {}  # per layer: the most experts one token chose there

    def observe(self, token: int, keys: Collection[Key]) -> None:
        """Records that a token with id `token` was routed to `keys` ((layer, expert) pairs)."""
        table = self.counts.setdefault(token, {})
        per_layer: dict[int, int] = {}
        for key in keys:
            table[key] = table.get(key, 0) + 1
            per_layer[key[0]] = per_layer.get(key[0], 0) + 1
        for layer, k in per_layer.items():
            self.top_k[layer] = max(self.top_k.get(layer, 0), k)

    def predict(self, token: int, fallback: Collection[Key] = ()) -> frozenset[Key]:
        """The predicted keys of a token with id `token` (`fallback` for an unseen id)."""
        table = self.counts.get(token)
        if not table:
            return frozenset(fallback)
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for (layer, e), c in table.items():
            by_layer.setdefault(layer, []).append((-c, e))
        out: set[Key] = set()
        for layer, scored in by_layer.items():
            out.update((layer, e) for _, e in sorted(scored)[: self.top_k[layer]])
        return frozenset(out)
