"""examples/lora_finetune.py on tiny settings: equal budgets, training moves the loss, plot, exact reload."""

from __future__ import annotations

import csv
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "4", "--hidden", "16", "--batch", "2", "--seq", "16", "--pretrain-steps", "2"]
TINY += ["--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--lr", "3e-2"]


@pytest.fixture
def lora_finetune(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    yield importlib.import_module("lora_finetune")
    sys.modules.pop("lora_finetune", None)


def test_lora_finetune_runs_at_equal_budgets(lora_finetune, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    out = lora_finetune.main(TINY + ["--variants", "lora,mola,dynmole", "--out", str(tmp_path), "--no-progress"])
    assert torch.get_num_threads() == threads  # restored
    results = out["results"]
    assert list(results) == ["lora", "mola", "dynmole"]
    budget = results["mola"]["params"]
    assert results["dynmole"]["params"] == budget
    assert abs(results["lora"]["params"] / budget - 1) < 0.05  # LoRA rank sized to MoLA's count
    assert results["lora"]["config"]["rank"] == 42  # 5 experts x rank 8 on average + routers
    for r in results.values():
        assert len(r["losses"]) == 4 and all(math.isfinite(v) for v in r["losses"])
        assert [s for s, _ in r["evals"]] == [0, 2, 4]
        assert r["evals"][0][1] == pytest.approx(out["base_loss"], abs=0)  # B = 0: exactly the base at step 0
        assert r["evals"][-1][1] != out["base_loss"]  # the adapter trained
    assert out["restored"] is True
    assert out["png"].stat().st_size > 1000
    with out["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"lora", "mola", "dynmole"}
    assert sum(1 for r in rows if r["heldout_loss"]) == 9
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "lora_finetune_dynmole.safetensors",
        "lora_finetune_lora.safetensors",
        "lora_finetune_mola.safetensors",
    ]


def test_lora_finetune_rejects_unknown_variant(lora_finetune, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lora_finetune.main(["--variants", "lora,qlora"])
    assert "qlora" in capsys.readouterr().err
