"""examples/offload_generate.py end to end on CPU: tokens, hit rates and the timeline line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_example_prints_measured_and_simulated_ms_per_token(policy: str) -> None:
    cmd = [sys.executable, "examples/offload_generate.py", "--device", "cpu", "--max-new-tokens", "6"]
    out = subprocess.run(
        cmd + ["--policy", policy, "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("measured"))
    measured = float(re.search(r"measured ([\d.]+) ms/token", line).group(1))  # type: ignore[union-attr]
    used = float(re.search(rf"{policy} \(used\) ([\d.]+)", line).group(1))  # type: ignore[union-attr]
    assert "oracle" in line and measured > 0
    # The run calibrates the timeline's compute, so the policy used comes back close to measured.
    assert used == pytest.approx(measured, rel=0.2)


def test_example_expert_quant_moves_quantized_bytes() -> None:
    cmd = [sys.executable, "examples/offload_generate.py", "--device", "cpu", "--max-new-tokens", "4", "--threads", "1"]
    out = subprocess.run(cmd + ["--expert-quant", "int4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("experts int4"))
    each = float(re.search(r"\(([\d.]+) MiB each", line).group(1))  # type: ignore[union-attr]
    assert "fused-cpu" in line or "dequantize-then-matmul" in line
    # The random model's expert (D = 256, H = 512): int4 with group 64 is 4.5 bits a weight.
    assert each == pytest.approx(3 * 256 * 512 * 4.5 / 8 / 2**20, abs=1e-3)
    moved = re.search(r"bytes moved ([\d.]+) MiB in (\d+) copies \+ (\d+) prefetches", out.stderr)
    assert moved is not None
    copies = int(moved.group(2)) + int(moved.group(3))
    assert copies > 0 and float(moved.group(1)) == pytest.approx(copies * each, rel=0.01)


example = load_script("examples/offload_generate.py", "offload_generate_example")


@pytest.mark.parametrize("family", example.FAMILIES)
def test_every_family_offloaded_gives_the_in_memory_tokens(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`offload_generate.py --family NAME --tiny --check` for every family patch() supports, in process
    (one interpreter: the imports dominate a subprocess per family)."""
    torch.set_num_threads(1)
    example.main(["--family", family, "--tiny", "--check", "--device", "cpu", "--max-new-tokens", "6"])
    err = capsys.readouterr().err
    assert "tokens equal to the in-memory model: yes" in err
    assert re.search(r"hit rate [\d.]+", err)
