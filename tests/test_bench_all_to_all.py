"""Smoke run of benchmarks/all_to_all.py on 2 gloo ranks: every variant measured, CSV written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def test_all_to_all_benchmark_two_ranks(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "benchmarks" / "all_to_all.py"), "--min-kib", "256", "--max-mib", "1"]
    cmd += ["--iters", "2", "--warmup", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "all_to_all_w2.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {
        "raw",
        "floor",
        "ep_a2a",
        "ep",
        "ep_train",
        "ep_planned",
        "ep_min",
        "ep_pipe4",
    }
    assert {int(r["bytes_per_rank"]) for r in rows} == {256 * 1024, 1024 * 1024}
    assert all(float(r["time_ms"]) > 0 and float(r["busbw_GBps"]) > 0 for r in rows)
    assert "% of raw" in out.stdout
