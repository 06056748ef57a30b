"""Smoke test of benchmarks/step_memory.py: steps run and, with the pool, later steps allocate no
fresh pooled buffer."""

from __future__ import annotations

import pytest
from conftest import load_script

from moe.cpu_memory import set_buffer_pool_limit

pytest.importorskip("moe._C", reason="the C++ extension is not built")


def test_later_steps_take_their_buffers_from_the_pool(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("benchmarks/step_memory.py", "bench_step_memory")
    try:
        rows = bench.main(["--config", "small", "--steps", "3", "--tokens", "256", "--pool-limit", str(1 << 30)])
    finally:
        set_buffer_pool_limit(None)
    assert len(rows) == 3 and all(r["faults"] >= 0 for r in rows)
    assert rows[1]["fresh"] == 0 and rows[2]["fresh"] == 0
    assert "peak RSS" in capsys.readouterr().out
