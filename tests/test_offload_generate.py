"""Offloaded generation of tiny random HF models equals the model fully in memory."""

from __future__ import annotations

import gc
import os
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe.offload as mo  # noqa: E402

D, I_MOE = 16, 8
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=I_MOE),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=I_MOE,
        shared_expert_intermediate_size=16,
        intermediate_size=32,
    ),
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=I_MOE, head_dim=8, intermediate_size=32
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=I_MOE, eos_token_id=None, pad_token_id=None),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=I_MOE,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_shared_experts=1,
        intermediate_size=32,
    ),
}
EXPERT_BYTES = (D * 2 * I_MOE + I_MOE * D) * 4
PROMPT = torch.tensor([[3, 17, 42, 5, 9]])
NEW_TOKENS = 10


def _save(family: str, tmp_path_factory: pytest.TempPathFactory, layers: int = 3) -> tuple[str, torch.Tensor, int]:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        family,
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **FAMILIES[family],
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # Spread router logits so greedy routing has no near-ties in fp32.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == 8:
                p.mul_(8.0)
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    expected = full.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    moe_layers = layers - (1 if family == "deepseek_v3" else 0)
    return path, expected, moe_layers


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor, int]:
    return _save("mixtral", tmp_path_factory)


def _guard_budget(om: mo.OffloadedModel, budget: int) -> list[int]:
    """Wraps the store so every device allocation checks the live expert bytes against the budget."""
    store, seen = om.runtime.store, []
    fetch = store.fetch

    def checked(key: tuple[int, int], prefetch: bool = False) -> object:
        entry = fetch(key, prefetch)
        live = sum(e.flat.numel() * e.flat.element_size() for e in store.device_entries.values())
        seen.append(live)
        assert live <= budget, f"{live} device bytes live > budget {budget}"
        return entry

    store.fetch = checked  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
@pytest.mark.parametrize("per_layer", [1, 2, 8])
@pytest.mark.parametrize("miss", ["copy", "cpu"])
def test_tokens_match_in_memory_model(mixtral, policy: str, per_layer: int, miss: str) -> None:
    torch.set_num_threads(1)
    path, expected, layers = mixtral
    budget = per_layer * layers * EXPERT_BYTES
    om = mo.load(path, "cpu", budget, policy, miss=miss, ram_cache_bytes=0 if per_layer == 1 else None)
    try:
        seen = _guard_budget(om, budget)
        out = om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, expected)
        stats = om.runtime.stats
        assert stats.requests > 0 and om.runtime.residency.peak_bytes <= budget
        assert all(live <= budget for live in seen)
        if miss == "cpu":
            assert stats.cpu_misses > 0 and stats.copies == 0
        elif per_layer < 8:
            assert stats.copies > 0 and len(om.runtime.store.device_entries) <= per_layer * layers
    finally:
        om.close()


def test_global_scope_and_lookahead(mixtral) -> None:
    path, expected, layers = mixtral
    om = mo.load(path, "cpu", 3 * layers * EXPERT_BYTES, "predictive", scope="global", lookahead=2)
    try:
        store, kinds = om.runtime.store, []
        fetch = store.fetch

        def recording(key: tuple[int, int], prefetch: bool = False) -> object:
            kinds.append(prefetch)
            return fetch(key, prefetch)

        store.fetch = recording  # type: ignore[method-assign]
        assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
        stats = om.runtime.stats
        assert stats.prefetches > 0
        # Prefetches reach the store as such (their own CUDA stream), demand misses as demand copies.
        assert (kinds.count(True), kinds.count(False)) == (stats.prefetches, stats.copies)
    finally:
        om.close()


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_families(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    torch.set_num_threads(1)
    path, expected, layers = _save(family, tmp_path_factory)
    for policy in ("lru", "predictive"):
        om = mo.load(path, "cpu", layers * EXPERT_BYTES, policy)
        try:
            assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
            assert om.runtime.residency.peak_bytes <= layers * EXPERT_BYTES
        finally:
            om.close()


def test_nothing_unpickled(mixtral, monkeypatch: pytest.MonkeyPatch) -> None:
    path, expected, layers = mixtral

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    om = mo.load(path, "cpu", layers * EXPERT_BYTES, "lru")
    try:
        assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
    finally:
        om.close()


def test_recorded_trace_replays_to_live_counters(mixtral, tmp_path) -> None:
    path, _, layers = mixtral
    for policy in ("lru", "lfu", "predictive"):
        om = mo.load(path, "cpu", 2 * layers * EXPERT_BYTES, policy, miss="copy", record_trace=True)
        try:
            om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            trace = om.runtime.recorded_trace()
            file = str(tmp_path / f"{policy}.safetensors")
            trace.save(file)
            replay = mo.simulate(mo.Trace.load(file), policy, capacity=2)
            live = om.runtime.stats
            if policy != "predictive":  # fp16 storage of the predictions may reorder near-ties
                assert (replay.hits, replay.copies) == (live.hits, live.copies)
            belady = mo.simulate(trace, "belady", capacity=2)
            assert belady.hit_rate >= replay.hit_rate
        finally:
            om.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
@pytest.mark.parametrize("per_layer", [1, 2])
@pytest.mark.parametrize("miss", ["copy", "auto"])
def test_cuda_tokens_match_in_memory_model(mixtral, policy: str, per_layer: int, miss: str) -> None:
    """The CUDA path: pinned RAM tier, copy stream, events; the same greedy tokens as the full model on CUDA."""
    path, _, layers = mixtral
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval().to("cuda")
    expected = full.generate(PROMPT.cuda(), max_new_tokens=NEW_TOKENS, do_sample=False).cpu()
    budget = per_layer * layers * EXPERT_BYTES
    om = mo.load(path, "cuda", budget, policy, miss=miss, ram_cache_bytes=0 if per_layer == 1 else None)
    try:
        seen = _guard_budget(om, budget)
        out = om.model.generate(PROMPT.cuda(), max_new_tokens=NEW_TOKENS, do_sample=False)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), expected)
        stats = om.runtime.stats
        assert stats.requests > 0 and om.runtime.residency.peak_bytes <= budget
        assert all(live <= budget for live in seen)
        if miss == "copy":
            assert stats.copies > 0 and stats.cpu_misses == 0
    finally:
        om.close()


# Families added by issue 16, from the shared tiny configs (D=32): tokens equal the in-memory model.
def _save_tiny(family: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor, int]:
    """(model dir, the in-memory model's greedy tokens, bytes of two experts in every MoE layer)."""
    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():  # non-zero expert / router biases (GPT-OSS) and selection biases: offload must carry them
        for name, param in model.named_parameters():
            if name.endswith(("_proj_bias", "router.bias")):
                param.copy_(torch.randn_like(param) * 0.2)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn_like(bias) * 0.1)
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)
    full = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    expected = full.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    experts = [m for m in full.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]
    expert_numel = (experts[0].gate_up_proj[0].numel() + experts[0].down_proj[0].numel()) * 4
    return path, expected, len(experts) * 2 * expert_numel


@pytest.mark.parametrize(
    "family",
    [
        "deepseek_v2",
        "glm4_moe",
        "dots1",
        "minimax",
        "qwen3_next",
        "jamba",
        "granitemoe",
        "granitemoeshared",
        "phimoe",
        "exaone_moe",
        "minicpm5_moe",
        "solar_open",
        "mellum",
        "minimax_m2",
        "granitemoe_swa",
        "qwen3_5_moe",
    ],  # fmt: skip
)
def test_more_families(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    torch.set_num_threads(1)
    path, expected, budget = _save_tiny(family, tmp_path_factory)
    om = mo.load(path, "cpu", config=mo.OffloadConfig(expert_cache_bytes=budget))
    try:
        assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
        assert om.runtime.residency.peak_bytes <= budget
    finally:
        om.close()


@pytest.mark.parametrize("miss", ["copy", "cpu"])
def test_gpt_oss_offloaded_with_expert_biases(miss: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """GPT-OSS: interleaved x @ W experts read from disk, biases resident, clamped SwiGLU; on the
    device path and the compute-where-it-lives (CPU miss) path."""
    torch.set_num_threads(1)
    path, expected, budget = _save_tiny("gpt_oss", tmp_path_factory)
    om = mo.load(path, "cpu", config=mo.OffloadConfig(expert_cache_bytes=budget, miss=miss))  # type: ignore[arg-type]
    try:
        experts = [m for m in om.model.modules() if isinstance(m, mo.OffloadedExperts)]
        assert len(experts) == 2 and all(e.b_in is not None and e.b_in.abs().sum() > 0 for e in experts)
        assert om.runtime.activation == "swiglu_oai"
        assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
        stats = om.runtime.stats
        assert stats.cpu_misses > 0 if miss == "cpu" else stats.copies > 0
    finally:
        om.close()


def test_gpt_oss_mxfp4_checkpoint_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The hub's GPT-OSS checkpoints store experts as MXFP4 blocks + scales: a clear error, not a wrong read."""
    from safetensors.torch import load_file, save_file

    path, _, _ = _save_tiny("gpt_oss", tmp_path_factory)
    state = load_file(f"{path}/model.safetensors")
    for name in [n for n in state if n.endswith("experts.gate_up_proj")]:
        state[name + "_blocks"] = torch.zeros(4, dtype=torch.uint8)
        state[name + "_scales"] = torch.zeros(4, dtype=torch.uint8)
        del state[name]
    save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mo.CheckpointError, match="MXFP4"):
        mo.load(path, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20))


@pytest.mark.parametrize("option", [{"expert_quant": "int8"}, {"miss_quant": "int4"}])
def test_gpt_oss_quantized_is_refused(option: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The quantized expert MLP has no biases and no clamped SwiGLU: a clear error, not GPT-OSS run wrong."""
    path, _, budget = _save_tiny("gpt_oss", tmp_path_factory)
    with pytest.raises(ValueError, match="GPT-OSS's experts .* not supported quantized"):
        mo.load(path, "cpu", config=mo.OffloadConfig(expert_cache_bytes=budget, **option))


def test_link_budget_counts_what_fits_before_the_next_layer() -> None:
    from moe.offload.engine import link_budget

    assert link_budget(window_s=1.0, backlog_s=0.2, copy_s=0.3) == 2
    assert link_budget(window_s=1.0, backlog_s=1.5, copy_s=0.3) == 0  # the link is already behind
    assert link_budget(window_s=1.0, backlog_s=0.0, copy_s=0.3, streams=2) == 6
    assert link_budget(window_s=0.1, backlog_s=0.0, copy_s=6.8e-3 * 100) == 0  # copies dominate


def test_runtime_prefetch_budget_uses_measured_layer_time_and_copies_in_flight(mixtral) -> None:
    path, _, _ = mixtral
    om = mo.load(path, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20, policy="predictive"))
    try:
        rt = om.runtime
        expert_bytes = rt.store.expert_bytes(0)
        assert rt.engine.prefetch_budget is None  # CPU device: the RAM tier is the device copy
        rt.cost = mo.CostModel(h2d_bytes_per_s=float(expert_bytes) / 1e-3, cpu_flops=1e9, device_flops=1e12)
        assert rt._prefetch_budget() == 1  # no layer measured yet
        rt.layer_seconds = 5.5e-3  # copies take 1 ms each
        rt.store.in_flight = lambda: 2  # type: ignore[method-assign]
        assert rt._prefetch_budget() == 3  # (5.5 ms - 2 ms in flight) / 1 ms
        with torch.no_grad():
            om.model(input_ids=torch.tensor([[1, 2, 3]]))
        assert 0.0 < rt.layer_seconds < 1.0  # measured between the layers' expert calls
    finally:
        om.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_close_unmaps_the_stores_shards(mixtral) -> None:
    """OffloadedModel.close() closes the shard files the expert store reads from: their memory maps
    go (the model's dense weights, views of the checkpoint's map, keep theirs while it lives)."""
    path = mixtral[0]

    def mapped() -> int:
        with open("/proc/self/maps") as maps:
            return sum(os.path.realpath(path) in line for line in maps)

    gc.collect()  # earlier tests' models, which map the same checkpoint
    om = mo.load(path, "cpu", config=mo.OffloadConfig(2 * mixtral[2] * EXPERT_BYTES, "lru", ram_cache_bytes=0))
    gc.collect()
    loaded = mapped()
    om.model.generate(PROMPT, max_new_tokens=2, do_sample=False)  # the store opens and reads its shard
    assert mapped() > loaded
    om.close()
    gc.collect()
    assert mapped() == loaded
