"""benchmarks/cuda_ops.py's table arithmetic on CPU (the timing itself needs a GPU: `make gpu`).

Its first GPU run divided bytes by the whole timing dict; these checks run that code path here.
"""

from __future__ import annotations

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/cuda_ops.py", "bench_cuda_ops")


def test_row_converts_bytes_and_microseconds_to_gb_per_s(bench) -> None:
    # 4e9 bytes in 1000 us is 4 TB/s; the copy took 800 us, so ours reached 80% of it.
    row = bench.table_row("permute", "T=1 D=1", 4_000_000_000, {"ours": 1000.0, "reference": 3000.0, "copy": 800.0})
    assert row["ours_GBps"] == pytest.approx(4000.0)
    assert row["pct_of_copy"] == pytest.approx(80.0)
    assert row["speedup_vs_reference"] == pytest.approx(3.0)
    assert row["MB"] == pytest.approx(4000.0)
    line = bench.format_row(row)
    assert line.split()[:2] == ["permute", "T=1"] and "80%" in line and "3.00x" in line
