"""benchmarks/offload_decode.py --small on the CPU: every policy row is finite and decodes the resident run's tokens."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    yield importlib.import_module("offload_decode")
    torch.set_num_threads(threads)
    sys.modules.pop("offload_decode", None)


def test_small_cpu_table(bench, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--device", "cpu", "--small", "--tokens", "6", "--warmup", "1", "--repeats", "1", "--threads", "1"]
    argv += ["--bw-repeats", "3", "--prompt-len", "5"]
    rows = bench.main(argv)
    out = capsys.readouterr().out

    assert [r["policy"] for r in rows] == ["resident", "lru", "lfu", "predictive"]
    for row in rows:
        for key, _, _ in bench.COLUMNS:
            if isinstance(row[key], float) and key != "sim_error":
                assert math.isfinite(row[key]) and row[key] >= 0.0, (row["policy"], key, row[key])
        # The timeline is calibrated on the resident run, so it reproduces that one; the others are
        # predictions (their accuracy is a benchmark result, BENCHMARKS.md, not a test).
        assert math.isfinite(row["sim_error"]) and row["sim_ms_per_token"] > 0.0
        assert row["same_tokens"] is True, row["policy"]
        assert row["tokens"] == rows[0]["tokens"] and len(row["tokens"]) == 7
        assert row["bound_ms"] >= row["compute_ms"] > 0.0 and row["ratio"] > 0.0
        # Belady moves no more than any policy: its floor is never above a policy's own bound.
        assert row["compute_ms"] <= row["floor_ms"] <= row["bound_ms"] + 1e-9 and row["ratio_floor"] > 0.0
        assert row["transfer_ms"] == pytest.approx(row["formula_ms"])  # batch 1, every miss copied
        assert f"| {row['policy']} | " in out
    resident = rows[0]
    assert resident["sim_error"] == pytest.approx(0.0, abs=1e-9)
    assert resident["hit_rate"] == 1.0 and resident["mib_moved_per_token"] == 0.0
    assert all(r["hit_rate"] < 1.0 and r["mib_moved_per_token"] > 0.0 for r in rows[1:])  # 2 of 8 experts per layer
    assert "measured/bound" in out and "target <= 1.3" in out
