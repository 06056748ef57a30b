"""benchmarks/trained_trace.py: a short run records a decode trace whose forecasts replay in the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

from moe.offload import Trace, simulate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "benchmarks" / "data" / "trained_tinylm_trace.safetensors"


def _bench():
    return load_script("benchmarks/trained_trace.py", "bench_trained_trace")


def test_a_short_run_records_every_token_and_layer(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    stats = _bench().main(["--steps", "2", "--windows", "1", "--lookahead", "2", "--out", str(out), "--threads", "1"])
    trace = Trace.load(str(out))
    assert (trace.num_layers, trace.num_experts, trace.lookahead) == (8, 32, 2)
    assert trace.num_steps == 128 * 8 and trace.layer_S[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert all(len(trace.needed(s)) == 4 for s in range(trace.num_steps))  # top-4, one token a step
    assert trace.ahead_SAE is not None and trace.probs_SE is not None
    # Votes are probabilities of experts in the forecast top-k: 4 non-zero per predicted layer.
    assert int((trace.ahead_SAE[0, 0] > 0).sum()) == 4 and float(trace.ahead_SAE[0, 0].max()) <= 1.0
    assert 0.0 <= stats["reuse"] <= 1.0 and 0.0 <= stats["next_layer_recall"] <= 1.0
    assert stats["unigram_loss"] > 0 and stats["heldout_loss"] > 0
    assert simulate(trace, "predictive", 8).requests == trace.num_steps * 4


def test_the_shipped_trace_is_a_trained_model_s() -> None:
    if not SHIPPED.exists():
        pytest.skip("shipped trace missing")
    trace = Trace.load(str(SHIPPED))
    assert "trained" in trace.source and "unigram" in trace.source
    assert (trace.num_layers, trace.num_experts) == (8, 32) and trace.num_steps == 8 * 128 * 8
