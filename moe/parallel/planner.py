"""The adaptive planner: picks each layer's (mode r, pipeline degree d) from online timings.

For every candidate plan it keeps timing samples (n, t), n = the largest number of routed token
copies on any rank, t = the slowest rank's forward time of the layer's expert section, and fits
t = alpha + beta * n (least squares; beta = 0 while all samples share one n). It picks the
plan with the lowest predicted t at the current n.

Life cycle (identical on every rank: all decisions use all_gathered numbers only):
    explore: run every candidate `warmup + samples` times, interleaved round-robin, measuring
             all but the warm-up runs; then pick the fastest.
    exploit: run the pick; every `check_every` steps measure it again and compare the global
             token distribution with the one seen at the last pick: if the routed copies per
             rank or the MaxVio imbalance moved by more than `shift_threshold` (relative),
             re-explore (old samples dropped); every `recheck_every` steps re-explore anyway.
A pinned plan (or a pinned mode or degree) restricts the candidates; a fully pinned plan runs
with no measurements and no extra collectives.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moe.config import PlannerConfig
from moe.parallel.alltoall import collective_device

__all__ = ["mode_name", "Plan", "Planner", "PlannerConfig", "timer"]


def mode_name(mode: int) -> str:
    """Short name of a compute mode r: 0 -> 'dp', 1 -> 'ep', r > 1 -> 'ep+shard<r>'."""
    return "dp" if mode == 0 else "ep" if mode == 1 else f"ep+shard{mode}"


@dataclass(frozen=True)
class Plan:
    """mode: 0 data parallel, 1 expert parallel, r > 1 EP with experts sharded over r ranks.
    chunks: pipeline degree d (>= 1)."""

    mode: int
    chunks: int = 1

    def __str__(self) -> str:
        return f"{mode_name(self.mode)}/d={self.chunks}"

    @staticmethod
    def parse(text: str) -> Plan:
        """'dp', 'ep', 'ep+shard2', optionally with '/d=4' -> Plan."""
        name, _, rest = text.partition("/d=")
        name = name.strip()
        mode = 0 if name == "dp" else 1 if name == "ep" else None
        if name.startswith("ep+shard") and name[8:].isdigit():
            mode = int(name[8:])
        if mode is None or (rest and not rest.isdigit()):
            raise ValueError(f"cannot parse plan {text!r}; use e.g. 'dp', 'ep', 'ep+shard2', 'ep/d=4'")
        return Plan(mode, int(rest) if rest else 1)


@dataclass
class _Model:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (n, seconds)

    def fit(self) -> tuple[float, float]:
        ns = [n for n, _ in self.samples]
        ts = [t for _, t in self.samples]
        if len(set(ns)) < 2:
            return statistics.median(ts), 0.0
        a = torch.tensor([[1.0, n] for n in ns], dtype=torch.float64)
        sol = torch.linalg.lstsq(a, torch.tensor(ts, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
        alpha, beta = float(sol[0]), max(float(sol[1]), 0.0)
        return alpha, beta

    def predict(self, n: float) -> float:
        alpha, beta = self.fit()
        return alpha + beta * n


class Planner:
    """Chooses a Plan per forward call for one layer (see the module docstring).

    Args:
        modes: valid modes of the layer's layout (moe.parallel.layout.valid_modes).
        group: process group used to agree on timings.
        config: PlannerConfig.
        pinned_mode / pinned_chunks: restrict the candidates (None = free).
    """

    def __init__(
        self,
        modes: list[int],
        group: Any = None,
        config: PlannerConfig | None = None,
        pinned_mode: int | None = None,
        pinned_chunks: int | None = None,
    ) -> None:
        self.config = config or PlannerConfig()
        self.group = group
        self.modes = modes
        self.pin(pinned_mode, pinned_chunks)

    def pin(self, mode: int | None = None, chunks: int | None = None) -> None:
        """Pins the mode and/or the pipeline degree (None frees it); restarts exploration."""
        if mode is not None and mode not in self.modes:
            raise ValueError(f"mode {mode} ({mode_name(mode)}) is not valid for this layout; valid: {self.modes}")
        if chunks is not None and chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        modes = [mode] if mode is not None else self.modes
        degrees = [chunks] if chunks is not None else list(self.config.chunk_options)
        self.candidates = [Plan(m, d) for m in modes for d in degrees]
        self.pinned = mode is not None and chunks is not None
        self.models: dict[Plan, _Model] = {p: _Model() for p in self.candidates}
        self.current = self.candidates[0]
        self.step = 0
        self.reason = "pinned by the user" if self.pinned else "exploring"
        self.predicted: dict[Plan, float] = {}
        self._ref: tuple[float, float] | None = None  # (n, MaxVio) at the last pick
        self._last: tuple[float, float] = (0.0, 0.0)
        self._explore()

    def _explore(self) -> None:
        if self.pinned:
            self._queue: list[tuple[Plan, bool]] = []
            return
        rounds = self.config.warmup + self.config.samples
        self._queue = [(p, r >= self.config.warmup) for r in range(rounds) for p in self.candidates]
        self._since_pick = 0
        self._runoff_done = False

    def queue_plans(self) -> list[Plan]:
        """The plans still to run in the current exploration (empty when exploiting)."""
        return [p for p, _ in self._queue]

    def choose(self) -> tuple[Plan, bool]:
        """(plan to run now, whether this call must be measured with record())."""
        self.step += 1
        if self.pinned:
            return self.current, False
        if self._queue:
            plan, measure = self._queue[0]
            self.current = plan
            return plan, True  # warm-up runs are timed too, so every rank takes the same path
        self._since_pick += 1
        if self._since_pick > self.config.recheck_every:  # same step count on every rank
            self.reason = f"periodic re-check after {self.config.recheck_every} steps"
            self._explore()
            self.current = self._queue[0][0]
            return self.current, True
        return self.current, self._since_pick % self.config.check_every == 0

    def record(self, plan: Plan, seconds: float, copies: int, load_E: torch.Tensor) -> None:
        """Agrees on the measurement across ranks (one all_gather) and updates the choice."""
        distributed = dist.is_initialized() and dist.get_world_size(self.group) > 1
        device = collective_device(self.group) if distributed else torch.device("cpu")
        mine = torch.cat(
            [torch.tensor([seconds, float(copies)], dtype=torch.float64, device=device), load_E.double().to(device)]
        )
        if distributed:
            table = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(table, mine, group=self.group)
            stacked = torch.stack(table).cpu()
        else:
            stacked = mine.unsqueeze(0)
        t, n = float(stacked[:, 0].max()), float(stacked[:, 1].max())
        load = stacked[:, 2:].sum(0)
        mean = float(load.mean()) if load.numel() else 0.0
        imbalance = 0.0 if mean <= 0 else float((load.max() - mean) / mean)
        self._last = (n, imbalance)
        if self._queue:
            _, measured = self._queue.pop(0)
            if measured:
                self._add(plan, n, t)
            if not self._queue:
                self._pick(n, imbalance)
            return
        self._add(plan, n, t)
        if self._shifted(n, imbalance):
            assert self._ref is not None
            self.reason = (
                f"token distribution shifted (copies/rank {self._ref[0]:.0f} -> {n:.0f}, "
                f"MaxVio {self._ref[1]:.2f} -> {imbalance:.2f}); re-exploring"
            )
            self.models = {p: _Model() for p in self.candidates}
            self._explore()

    def _add(self, plan: Plan, n: float, t: float) -> None:
        samples = self.models[plan].samples
        samples.append((n, t))
        del samples[: -self.config.max_samples]

    def _shifted(self, n: float, imbalance: float) -> bool:
        if self._ref is None:
            return False
        n0, v0 = self._ref
        thr = self.config.shift_threshold
        return abs(n - n0) > thr * max(n0, 1.0) or abs(imbalance - v0) > thr * max(v0, 0.5)

    def _pick(self, n: float, imbalance: float) -> None:
        self.predicted = {p: m.predict(n) for p, m in self.models.items() if m.samples}
        ranked = sorted(self.predicted, key=lambda p: (self.predicted[p], p.mode, p.chunks))
        best = ranked[0]
        margin = self.config.runoff_margin
        if (
            margin > 0
            and len(ranked) > 1
            and not self._runoff_done
            and self.predicted[ranked[1]] <= (1 + margin) * self.predicted[best]
        ):
            # The two best are within the noise of a few samples: a run-off, twice the samples
            # each, alternating (the same decision on every rank: they share the timings).
            self._runoff_done = True
            self._queue = [(p, True) for _ in range(2 * self.config.samples) for p in ranked[:2]]
            self.current = ranked[0]
            self.reason = f"run-off between {ranked[0]} and {ranked[1]} (predicted within {100 * margin:.0f}%)"
            return
        runner = f"; next {ranked[1]} {1e3 * self.predicted[ranked[1]]:.2f} ms" if len(ranked) > 1 else ""
        self.reason = f"fastest predicted at {n:.0f} copies/rank: {best} {1e3 * self.predicted[best]:.2f} ms{runner}"
        self.current, self._ref = best, (n, imbalance)

    def report(self) -> dict[str, Any]:
        """The choice, why, and every candidate's samples and fitted cost model (times in ms)."""
        rows: dict[str, dict[str, Any]] = {}
        for p, m in self.models.items():
            if not m.samples:
                rows[str(p)] = {"samples": 0}
                continue
            alpha, beta = m.fit()
            rows[str(p)] = {
                "samples": len(m.samples),
                "median_ms": 1e3 * statistics.median(t for _, t in m.samples),
                "alpha_ms": 1e3 * alpha,
                "beta_us_per_copy": 1e6 * beta,
                "predicted_ms": 1e3 * self.predicted[p] if p in self.predicted else None,
            }
        return {
            "plan": str(self.current),
            "pinned": self.pinned,
            "exploring": bool(self._queue),
            "reason": self.reason,
            "step": self.step,
            "copies_per_rank": self._last[0],
            "max_violation": self._last[1],
            "candidates": rows,
        }


def timer() -> float:
    """The planner's clock in seconds (time.perf_counter; a function so tests can replace it)."""
    return time.perf_counter()
