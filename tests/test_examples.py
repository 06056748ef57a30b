"""The quickstart trains (loss goes down) and the balance benchmark runs every router."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--layers", "1", "--dim", "32", "--experts", "4", "--top-k", "2", "--batch-size", "8", "--seq-len", "32"]


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    for name in ("quickstart", "balance", "tiny_lm"):
        sys.modules.pop(name, None)


def test_quickstart_loss_decreases(examples) -> None:
    quickstart = importlib.import_module("quickstart")
    argv = ["--steps", "25", "--router", "aux_free", "--train-bytes", "200000", "--eval-batches", "2", "--no-progress"]
    result = quickstart.main(argv + TINY_MODEL + ["--log-every", "1000"])
    assert len(result.losses) == 25
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert result.heldout_loss < math.log(256)
    assert 0.0 <= result.max_vio <= 4 / 2 - 1 + 1e-6  # E/K - 1 is the worst possible MaxVio


def test_balance_core_runs_every_router(examples) -> None:
    balance = importlib.import_module("balance")
    tiny_lm = importlib.import_module("tiny_lm")
    torch.set_num_threads(1)
    data = tiny_lm.load_stdlib_bytes(100_000)
    model_cfg = tiny_lm.TinyLMConfig(dim=32, num_layers=2, num_experts=4, top_k=2, max_seq_len=16)
    train_cfg = tiny_lm.TrainConfig(steps=2, batch_size=4, seq_len=16, warmup=1, eval_batches=1, maxvio_window=2)
    specs = balance.router_specs(recurrent_dim=16)
    rows = balance.run_benchmark(specs, [0], model_cfg, train_cfg, data, progress=False)
    assert [r["router"] for r in rows] == [s.name for s in specs]
    for row in rows:
        assert math.isfinite(row["heldout_loss"]) and 0.0 <= row["max_vio"] <= 1.0 + 1e-6
        assert len(row["max_vio_curve"]) == 2
    table = balance.summarize(rows)
    assert next(e for e in table if e["router"] == balance.BASELINE)["max_vio_ratio"] == pytest.approx(1.0)
    assert "| aux_free |" in balance.format_table(table)


def test_tiny_lm_is_causal_and_rejects_expert_choice(examples) -> None:
    tiny_lm = importlib.import_module("tiny_lm")
    torch.manual_seed(0)
    for router in ("topk", "aux_free", "recurrent"):
        options = {"recurrent_dim": 8} if router == "recurrent" else {}
        model = tiny_lm.TinyLM(
            tiny_lm.TinyLMConfig(dim=16, num_layers=2, num_experts=4, top_k=2, router=router, router_options=options)
        ).eval()
        tokens = torch.randint(0, 256, (2, 12))
        changed = tokens.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 256
        with torch.no_grad():
            # Same routing and outputs for the unchanged prefix (up to attention's summation order).
            torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(model(tokens)[:, 8:], model(changed)[:, 8:])
    with pytest.raises(ValueError, match="leaks the future"):
        tiny_lm.TinyLMConfig(router="expert_choice")


def test_mos_distill_example_runs_and_kd_moves_the_student(examples) -> None:
    mos = importlib.import_module("mos_distill")
    argv = ["--steps", "6", "--kd-stop", "4", "--teacher-layers", "2", "--student-layers", "1", "--dim", "16"]
    out = mos.main(argv + ["--batch-size", "4", "--seq-len", "16", "--train-bytes", "100000", "--eval-batches", "1"])
    assert set(out) == {"teacher", "student", "student_kd"}
    assert all(math.isfinite(v) for v in out.values())
    assert out["student"] != out["student_kd"]  # same batches and init: only the KD term differs
    sys.modules.pop("mos_distill", None)


def test_tiny_lm_pyramid_config(examples) -> None:
    tiny_lm = importlib.import_module("tiny_lm")
    cfg = tiny_lm.TinyLMConfig(dim=16, num_layers=3, num_experts=[2, 4, 8], top_k=(1, 2, 2), residual=True)
    model = tiny_lm.TinyLM(cfg)
    assert [(m.config.num_experts, m.config.top_k, m.config.residual) for m in model.moe_layers()] == [
        (2, 1, True),
        (4, 2, True),
        (8, 2, True),
    ]
    total, active = model.param_counts()
    per_expert = 16 * 2 * 64 + 64 * 16  # w_in [D, 2H] + w_out [H, D], H = 64
    assert total - active == per_expert * ((2 - 1) + (4 - 2) + (8 - 2))
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)
    with pytest.raises(ValueError, match="per-layer values but num_layers is 3"):
        tiny_lm.TinyLMConfig(num_layers=3, num_experts=(4, 8))
    with pytest.raises(ValueError, match="layer 0: top_k"):
        tiny_lm.TinyLMConfig(num_layers=2, num_experts=(1, 8), top_k=2)


def test_pr_moe_benchmark_smoke(examples) -> None:
    pr_moe = importlib.import_module("pr_moe")
    rows = pr_moe.main(
        ["--steps", "2", "--dim", "16", "--hidden", "16", "--batch-size", "2", "--seq-len", "16"]
        + ["--train-bytes", "100000", "--eval-batches", "1", "--no-progress"]
    )
    assert [r["model"] for r in rows] == ["standard", "top-2", "residual", "pr-moe", "student", "mos"]
    by = {r["model"]: r for r in rows}
    assert by["pr-moe"]["params"] < by["residual"]["params"] and by["mos"]["params"] < by["pr-moe"]["params"]
    assert by["pr-moe"]["experts"] == "4x4x8x8" and by["mos"]["experts"] == by["student"]["experts"] == "4x8x8"
    assert by["top-2"]["params"] == by["standard"]["params"] < by["top-2"]["active_params"] * 4
    assert all(math.isfinite(r["heldout_loss"]) for r in rows)
    sys.modules.pop("pr_moe", None)
