"""benchmarks/bench_harness.py: interleaving order, warm-up, medians, CSV round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def harness() -> Any:
    return load_script("benchmarks/bench_harness.py", "bench_harness")


def test_candidates_interleave_after_warmup(harness: Any) -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    ticks = iter(range(100))
    samples = harness.time_interleaved(fns, 3, warmup=2, clock=lambda fn: (fn(), float(next(ticks)))[1])
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert samples == {"a": [0.0, 3.0, 6.0], "b": [1.0, 4.0, 7.0], "c": [2.0, 5.0, 8.0]}
    assert harness.medians(samples) == {"a": 3.0, "b": 4.0, "c": 5.0}


def test_default_clock_times_each_call(harness: Any) -> None:
    count = [0]

    def work() -> None:
        count[0] += 1

    samples = harness.time_interleaved({"w": work}, 4, warmup=1, inner=3)
    assert count[0] == 1 + 4 * 3
    assert len(samples["w"]) == 4 and all(t >= 0 for t in samples["w"])
    assert harness.medians({"x": [5.0, 1.0, 3.0, 2.0]}) == {"x": 2.5}


def test_csv_round_trip(harness: Any, tmp_path: Path) -> None:
    rows = [{"name": "a", "ms": 1.5, "n": 3}, {"name": "b", "ms": 0.25, "n": 4}]
    path = tmp_path / "deep" / "out.csv"
    harness.write_csv(path, rows)
    assert harness.read_csv(path) == [{k: str(v) for k, v in r.items()} for r in rows]
    harness.write_csv(path, rows, fieldnames=["n", "name", "ms"])
    assert path.read_text().splitlines()[0] == "n,name,ms"
