"""Smoke test of benchmarks/moe_layer.py: every candidate builds, agrees with ours, and the table prints."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("benchmarks/moe_layer.py", "bench_moe_layer")


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_every_candidate_matches_ours_on_the_small_config(bench) -> None:
    torch.set_num_threads(1)
    shape = bench.SMALL["standard"]
    x = torch.randn(1, shape.tokens, shape.dim)
    cands, skipped = bench.build(shape, x, torch.float32, torch.device("cpu"))
    names = [c.name for c in cands]
    assert names[0] == "ours[reference]" and "ours[auto]" in names
    assert len(cands) + len(skipped) >= 7, (names, skipped)  # ours x2 + 5 peers, built or skipped with a reason
    bench.check_outputs(cands, x)  # raises on a wrong shape or non-finite output
    for c in cands:
        assert c.diff is not None and c.diff < 1e-4, (c.name, c.diff)
        if c.dropped is not None:  # capacity peers: the drop count is consistent with the kept tokens
            assert 0 <= c.dropped <= shape.tokens * shape.top_k
            assert c.kept_T is not None and (c.dropped == 0) == bool(c.kept_T.all())
    # Backward runs for every candidate and gives finite input gradients of x's shape.
    for c in cands:
        xg = x.clone().requires_grad_(True)
        c.run(xg).backward(torch.ones_like(xg))
        assert xg.grad is not None and xg.grad.shape == x.shape and torch.isfinite(xg.grad).all(), c.name


def test_floor_flops_and_main_prints_the_table(bench, capsys, tmp_path) -> None:
    shape = bench.SMALL["fine"]
    assert shape.flops(backward=True) == 3 * shape.flops(backward=False)
    rows = bench.main(
        [
            "--small",
            "--config",
            "fine",
            "--threads",
            "1",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--csv",
            str(tmp_path / "b.csv"),
            "--png",
            "",
        ]
    )
    out = capsys.readouterr().out
    assert "fine-small" in out and "floor" in out and "ours[reference]" in out
    assert (tmp_path / "b.csv").read_text().startswith("config,candidate,")
    floor = [r for r in rows if r["candidate"] == "floor"]
    assert len(floor) == 1 and floor[0]["fwd_bwd_x_floor"] == 1.0
    for r in rows:
        assert math.isfinite(r["fwd_bwd_ms"]) and r["fwd_bwd_ms"] > 0, r


def test_keep_freed_memory_flag_applies_the_glibc_settings(tmp_path: Path) -> None:
    import subprocess

    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--small", "--config", "standard"]
    cmd += ["--reps", "1", "--warmup", "0", "--skip", "hf,deepspeed,tutel,torch_gmm", "--keep-freed-memory"]
    cmd += ["--csv", "", "--png", ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "glibc keeps freed memory" in out
