"""benchmarks/offload.py --quick: hit-rate table and the timeline CSV with the columns issue 15 names."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_the_timeline_csv(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/offload.py", "--quick", "--no-record", "--sizes", "0.25", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "offload.csv").open()))
    need = {"trace", "preset", "fraction", "policy", "hit_rate", "ready_rate", "bytes_per_token", "sim_ms_per_token"}
    assert need <= set(rows[0])
    assert {r["policy"] for r in rows} >= {"lru", "lfu", "predictive", "predictive_cpu", "belady", "oracle"}
    assert any("trained" in r["trace"] for r in rows) and any("synthetic" in r["trace"] for r in rows)
    presets = {r["preset"] for r in rows}
    assert presets == {"h100-mixtral", "4090-qwen3-30b-a3b", "4090-qwen3-30b-a3b-int4"}
    for r in rows:  # nothing beats having every expert resident; Belady moves the fewest bytes
        same = [x for x in rows if x["trace"] == r["trace"] and x["preset"] == r["preset"]]
        resident = next(x for x in same if x["policy"] == "resident")
        assert float(r["sim_ms_per_token"]) >= float(resident["sim_ms_per_token"]) - 1e-6
        if r["policy"] in ("lru", "lfu", "predictive"):
            belady = next(x for x in same if x["policy"] == "belady")
            assert float(r["hit_rate"]) <= float(belady["hit_rate"]) + 1e-9
    assert "targets at 25% cache" in out.stdout and (tmp_path / "offload_hits.csv").exists()
