"""Clear errors: missing/truncated shard, config not matching weights, budget below one expert."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe.offload as mo  # noqa: E402

EXPERT_BYTES = (16 * 16 + 8 * 16) * 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    path = str(tmp_path_factory.mktemp("sharded"))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="8KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return path


def _copy(src: str, tmp_path) -> str:  # noqa: ANN001
    dst = str(tmp_path / "model")
    shutil.copytree(src, dst)
    return dst


def _shards(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


def test_sharded_loads(sharded: str) -> None:
    om = mo.load(sharded, "cpu", 2 * EXPERT_BYTES, "lru")
    try:
        out = om.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
    finally:
        om.close()


def test_missing_shard(sharded: str, tmp_path) -> None:  # noqa: ANN001
    path = _copy(sharded, tmp_path)
    os.remove(os.path.join(path, _shards(path)[-1]))
    with pytest.raises(mo.CheckpointError, match="missing"):
        mo.load(path, "cpu", 2 * EXPERT_BYTES)


def test_truncated_shard(sharded: str, tmp_path) -> None:  # noqa: ANN001
    path = _copy(sharded, tmp_path)
    shard = os.path.join(path, _shards(path)[0])
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(mo.CheckpointError, match="truncated"):
        mo.load(path, "cpu", 2 * EXPERT_BYTES)


def test_no_safetensors(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(mo.CheckpointError, match="never pickle"):
        mo.load(str(tmp_path), "cpu", 2 * EXPERT_BYTES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("num_local_experts", 8, "config does not match weights"), ("intermediate_size", 12, "config does not match")],
)
def test_config_mismatch(sharded: str, tmp_path, field: str, value: int, message: str) -> None:  # noqa: ANN001
    path = _copy(sharded, tmp_path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(mo.CheckpointError, match=message):
        mo.load(path, "cpu", 4 * EXPERT_BYTES)


def test_budget_below_one_expert(sharded: str) -> None:
    with pytest.raises(mo.BudgetError, match="one expert"):
        mo.load(sharded, "cpu", EXPERT_BYTES, "lru")  # 2 layers: half an expert per layer
    with pytest.raises(mo.BudgetError, match="one expert"):
        mo.load(sharded, "cpu", EXPERT_BYTES - 1, "lru", scope="global")


def test_bad_options(sharded: str) -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        mo.load(sharded, "cpu", 4 * EXPERT_BYTES, "fifo")
    with pytest.raises(ValueError, match="miss must be"):
        mo.load(sharded, "cpu", 4 * EXPERT_BYTES, "lru", miss="never")
    with pytest.raises(ValueError, match="scope"):
        mo.load(sharded, "cpu", 4 * EXPERT_BYTES, "lru", scope="row")


def test_a_failed_read_is_not_cached() -> None:
    """A read error reaches the caller once; the expert is not left resident with a dead copy."""
    from moe.routing.topk import TopKRouter

    failures = {"left": 1}

    def reader(key: tuple[int, int], out: torch.Tensor) -> None:
        if key == (0, 1) and failures["left"]:
            failures["left"] -= 1
            raise OSError("transient EIO")
        out.fill_(0.01)

    shape = mo.ExpertShape(4, 2, 4)
    store = mo.ExpertStore(reader, {0: shape}, torch.float32, "cpu", ram_cache_bytes=0)
    runtime = mo.OffloadRuntime(store, mo.OffloadConfig(2 * 4 * 24, "lru", miss="copy"), [TopKRouter(4, 4, 1)], [4])
    x = torch.randn(1, 4)

    def run(expert: int) -> torch.Tensor:
        counts = torch.zeros(4, dtype=torch.long)
        counts[expert] = 1
        return runtime.run_layer(0, x, counts)

    try:
        with pytest.raises(OSError, match="transient EIO"):
            run(1)
        assert (0, 1) not in runtime.residency and (0, 1) not in store.device_entries
        first = run(1)  # read again, now healthy
        torch.testing.assert_close(run(1), first)
        for expert in (2, 3):  # evictions of healthy experts raise nothing
            run(expert)
    finally:
        runtime.close()


def test_a_missing_expert_tensor_is_found_at_load(sharded: str, tmp_path) -> None:  # noqa: ANN001
    """One projection of one expert (not expert 0) missing: a CheckpointError at load time,
    not an error in the middle of generation."""
    from safetensors.torch import load_file, save_file

    path = _copy(sharded, tmp_path)
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path))
    victim = next(k for k in index["weight_map"] if "layers.1." in k and "experts" in k and ("w2" in k or "down" in k))
    if ".experts.0." in victim:
        victim = victim.replace(".experts.0.", ".experts.3.")
    shard = os.path.join(path, index["weight_map"].pop(victim))
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    json.dump(index, open(index_path, "w"))
    with pytest.raises(mo.CheckpointError, match="incomplete|missing|disagree"):
        mo.load(path, "cpu", 2 * 4 * EXPERT_BYTES, "lru")
