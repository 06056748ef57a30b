"""What every benchmark shares: timing (warm-up, interleaved candidates, medians, device syncs),
CSV rows and optional PNG figures, so every benchmark measures and writes the same way.

    samples = time_interleaved({"ours": f, "floor": g}, reps=10, warmup=2, device=device)
    print(medians(samples)); write_csv("bench_out/x.csv", rows)

Each benchmark puts this folder on sys.path (appended, so it shadows nothing) and imports it
as `bench_harness`.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["sync", "Clock", "time_interleaved", "medians", "write_csv", "read_csv", "pyplot", "save_png"]


def sync(device: torch.device | str | None = None) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously); a no-op on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times one call in seconds: wall time on the CPU; CUDA events (after a synchronize) on CUDA."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn: Callable[[], Any], inner: int = 1) -> float:
        """Seconds per call of fn, averaged over `inner` back-to-back calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    reps: int,
    *,
    warmup: int = 1,
    inner: int = 1,
    device: torch.device | str = "cpu",
    clock: Callable[[Callable[[], Any]], float] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every candidate, `reps` samples each.

    Each candidate first runs `warmup` times (allocator, lazy init, autotuning); then every
    repetition runs all candidates once, in order, so a drifting machine load hits all of them
    alike. `clock(fn) -> seconds` replaces the default Clock(device).time (e.g. the slowest rank's
    time across a process group).
    """
    measure = clock if clock is not None else (lambda fn: Clock(device).time(fn, inner))
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(measure(fn))
    return samples


def medians(samples: Mapping[str, Iterable[float]]) -> dict[str, float]:
    """{name: median of its samples}."""
    return {name: statistics.median(list(s)) for name, s in samples.items()}


def write_csv(path: str | os.PathLike[str], rows: list[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
    """Writes rows (columns: fieldnames, default the first row's keys in order); makes the folder."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames if fieldnames is not None else list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows write_csv wrote (values as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Saves a matplotlib figure (making the folder) and closes it."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt = pyplot()
    if plt is not None:
        plt.close(fig)
