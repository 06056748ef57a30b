"""apply_lora_moe on a tiny random Llama: identity at init, frozen base, allocation, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import moe
from moe.lora import (
    LoRAMoELinear,
    MoSLinear,
    apply_lora_moe,
    experts_per_layer,
    load_lora_moe,
    read_metadata,
    save_lora_moe,
    trainable_parameters,
)

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

ROUTERS = ["topk", "dynmole", "mos"]
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 4) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


def _randomise_adapter(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)


@pytest.mark.parametrize("router", ROUTERS)
def test_init_output_equals_base_exactly(router: str, tokens: torch.Tensor) -> None:
    model = tiny_llama()
    expected = model(tokens).logits
    apply_lora_moe(model, TARGETS, "2-4-6-8", rank=4, alpha=8, router=router)
    assert torch.equal(model(tokens).logits, expected)


@pytest.mark.parametrize("router", ROUTERS)
def test_only_adapter_params_get_grads(router: str, tokens: torch.Tensor) -> None:
    model = apply_lora_moe(tiny_llama(), TARGETS, "2-4-6-8", rank=4, alpha=8, router=router, balance_coef=1e-3)
    _randomise_adapter(model)  # B != 0 so A and routers get gradients too
    model.train()
    loss = model(tokens, labels=tokens).loss + moe.aux_loss(model)
    loss.backward()
    adapter_names = ("lora_A", "lora_B", "router.", "private_A", "private_B", "lora_mos_pools.")
    for name, p in model.named_parameters():
        is_adapter = any(a in name for a in adapter_names)
        assert p.requires_grad == is_adapter, name
        if is_adapter:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name


def test_param_counts_match_allocation() -> None:
    model = tiny_llama(layers=8)
    apply_lora_moe(model, ["q_proj", "down_proj"], "2-4-6-8", rank=4, alpha=8)
    counts = experts_per_layer("2-4-6-8", 8)
    assert counts == [2, 2, 4, 4, 6, 6, 8, 8]
    d, f = 16, 24
    expected = 0
    for e in counts:
        expected += e * 4 * (d + d) + e * d  # q_proj: A [E, 16, 4], B [E, 4, 16], router [E, 16]
        expected += e * 4 * (f + d) + e * f  # down_proj: A [E, 24, 4], B [E, 4, 16], router [E, 24]
    assert trainable_parameters(model) == expected
    for i, e in enumerate(counts):
        q = model.model.layers[i].self_attn.q_proj
        assert isinstance(q, LoRAMoELinear) and q.num_experts == e and q.lora_A.shape == (e, d, 4)
    # explicit per-layer list, and one expert = plain LoRA (no router)
    plain = apply_lora_moe(tiny_llama(layers=8), "q_proj", 1, rank=4, alpha=8)
    assert trainable_parameters(plain) == 8 * 4 * (d + d)
    explicit = apply_lora_moe(tiny_llama(layers=8), "q_proj", [1, 2, 3, 4, 5, 6, 7, 8], rank=2, alpha=2)
    assert [m.self_attn.q_proj.num_experts for m in explicit.model.layers] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_mos_shares_pools_and_is_smaller_than_lora() -> None:
    lora = apply_lora_moe(tiny_llama(hidden=32, layers=16), TARGETS, 1, rank=8, alpha=16)
    mos = apply_lora_moe(tiny_llama(hidden=32, layers=16), TARGETS, rank=8, alpha=16, router="mos")
    q0, q1 = mos.model.layers[0].self_attn.q_proj, mos.model.layers[1].self_attn.q_proj
    assert isinstance(q0, MoSLinear) and q0.pool is q1.pool is mos.lora_mos_pools["q_proj"]
    ratio = trainable_parameters(lora) / trainable_parameters(mos)
    assert 6.0 < ratio <= 8.5, ratio
    a_RD, bt_RN = q0.lora_matrices()
    assert a_RD.shape == (8, 32) and bt_RN.shape == (8, 32)
    shard = mos.lora_mos_pools["q_proj"].shards_A[int(q0.index_A[0])] if int(q0.index_A[0]) < 32 else None
    if shard is not None:
        assert torch.equal(a_RD[0, :16], shard)


@pytest.mark.parametrize("router", ROUTERS)
def test_save_load_round_trip_exact(router: str, tokens: torch.Tensor, tmp_path: Path) -> None:
    model = apply_lora_moe(tiny_llama(), TARGETS, "2-4-6-8", rank=4, alpha=8, router=router, top_k=2)
    _randomise_adapter(model)
    expected = model(tokens).logits
    path = tmp_path / "adapter.safetensors"
    save_lora_moe(model, path)
    meta = read_metadata(path)
    assert meta["modules"]["model.layers.3.self_attn.q_proj"]["rank"] == 4
    if router != "mos":
        assert meta["experts_per_layer"]["model.layers.3.mlp.down_proj"] == 8
    fresh = load_lora_moe(tiny_llama(), path)
    assert torch.equal(fresh(tokens).logits, expected)
    assert trainable_parameters(fresh) == trainable_parameters(model)
    # loading into an already-adapted model with the same layout also restores it
    again = apply_lora_moe(tiny_llama(), TARGETS, "2-4-6-8", rank=4, alpha=8, router=router, top_k=2)
    assert torch.equal(load_lora_moe(again, path)(tokens).logits, expected)


def test_adapter_file_holds_no_base_weights(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = apply_lora_moe(tiny_llama(), "q_proj", 2, rank=2, alpha=2)
    save_lora_moe(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {
        f"model.layers.{i}.self_attn.q_proj.{n}" for i in range(4) for n in ("lora_A", "lora_B", "router.weight")
    }


def test_load_into_mismatched_base_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_lora_moe(apply_lora_moe(tiny_llama(), TARGETS, "2-4-6-8", rank=4, alpha=8), path)
    with pytest.raises(ValueError, match="does not match"):
        load_lora_moe(tiny_llama(hidden=32), path)  # shape mismatch
    with pytest.raises(ValueError, match="no module"):
        load_lora_moe(tiny_llama(layers=2), path)  # missing layers
    other = apply_lora_moe(tiny_llama(), TARGETS, "8-6-4-2", rank=4, alpha=8)
    with pytest.raises(ValueError, match="differ"):
        load_lora_moe(other, path)
    with pytest.raises(ValueError, match="not a moe.lora adapter"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
        load_lora_moe(tiny_llama(), tmp_path / "b.safetensors")


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="no module matches"):
        apply_lora_moe(tiny_llama(), ["qkv_proj"], 2)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        apply_lora_moe(tiny_llama(), ["mlp"], 2)
    with pytest.raises(ValueError, match="not divisible"):
        apply_lora_moe(tiny_llama(layers=6), "q_proj", "2-4-6-8")
    with pytest.raises(ValueError, match="one count per layer"):
        apply_lora_moe(tiny_llama(), "q_proj", [2, 4, 6])
    with pytest.raises(ValueError, match="'2-x'"):
        apply_lora_moe(tiny_llama(), "q_proj", "2-x")
    with pytest.raises(ValueError, match="router must be"):
        apply_lora_moe(tiny_llama(), "q_proj", 2, router="switch")
    with pytest.raises(ValueError, match=">= 1"):
        apply_lora_moe(tiny_llama(), "q_proj", "0-2")
    with pytest.raises(ValueError, match="already has"):
        apply_lora_moe(apply_lora_moe(tiny_llama(), "q_proj", 2), "q_proj", 2)
    with pytest.raises(ValueError, match="divisible by shards_per_vector"):
        apply_lora_moe(tiny_llama(), "q_proj", router="mos", mos_shards_per_vector=3)
    with pytest.raises(ValueError, match="no LoRA-MoE adapter"):
        save_lora_moe(tiny_llama(), "/nonexistent/never_written.safetensors")
    bad_arguments = [
        (dict(rank=0), ValueError, "rank must be an int >= 1"),
        (dict(num_layers=0), ValueError, "num_layers must be an int >= 1"),
        (dict(alpha=None), ValueError, "alpha must be a finite number"),
        (dict(router="mos", mos_shards_per_vector=0), ValueError, "mos_shards_per_vector must be"),
        (dict(router="mos", mos_compression=0.0), ValueError, "mos_compression must be"),
        (dict(experts_per_layer=2.0), TypeError, "experts_per_layer must be"),
        (dict(compute="bad"), ValueError, "compute must be"),
    ]
    for kwargs, error, message in bad_arguments:
        with pytest.raises(error, match=message):
            apply_lora_moe(tiny_llama(), "q_proj", **kwargs)  # type: ignore[arg-type]


def test_a_refused_call_leaves_the_model_untouched() -> None:
    """An error found at a later target must not leave the model frozen and half wrapped."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="covers 3 layers"):
        apply_lora_moe(model, ["0", "2", "4"], 2, num_layers=3)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model) and all(p.requires_grad for p in model.parameters())
    apply_lora_moe(model, ["0", "2", "4"], 2, num_layers=5)  # the retry works


def test_plain_pytorch_model_without_config() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(4, 6)
    expected = model(x)
    apply_lora_moe(model, ["0", "2"], [3, 1, 5], rank=2, alpha=4, router="dynmole")  # layers 0..2
    assert torch.equal(model(x), expected)
    assert model[2].num_experts == 5 and float(moe.aux_loss(model).detach()) > 0


def test_top1_router_learns() -> None:
    """A renormalised top-1 weight is exactly 1: the router would get no gradient at all."""
    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 8), num_experts=4, rank=2, alpha=4, router="topk", top_k=1)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(6, 8)).pow(2).sum().backward()
    assert layer.router is not None and layer.router.weight.grad.abs().sum() > 1e-3
