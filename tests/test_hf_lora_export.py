"""LoRA-MoE adapters through export: a patched HF model fine-tuned with moe.lora adapters goes back
to the unpatched HF class (unpatch(model, merge_adapters=True) + save_pretrained) with equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close
from hf_tiny import tiny_config, transformers
from torch import nn

import moe.lora
from moe.integrations.transformers import HFMoEBlock, patch, unpatch

IDS = torch.tensor([[3, 17, 42, 5, 9, 33, 21]])


def adapted_model(router: str, experts: int = 1) -> nn.Module:
    """Qwen2-MoE (a routed block with a gated shared expert), patched, then adapters on attention and on
    every gate_proj (the dense layer's and the shared expert's inside our block), B made non-zero as
    fine-tuning would (MoS: the shared expert's gate_proj only)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")).eval()
    assert patch(model) == 1
    # MoS shares one shard pool per projection name, so it adapts one shape: the shared expert's gate_proj.
    targets = ["q_proj", "shared_experts.gate_proj" if router == "mos" else "gate_proj"]
    moe.lora.apply_lora_moe(model, targets, experts_per_layer=experts, rank=4, router=router)
    adapters = moe.lora.adapter_modules(model)
    assert any(".moe.shared_experts.gate_proj" in p for p in adapters)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "private_B" in name or "shards_B" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    return model


@pytest.mark.parametrize("router", ["topk", "mos"])
def test_merged_adapters_export_to_the_hf_class(router: str, tmp_path: Path) -> None:
    model = adapted_model(router)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        base_logits = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")).eval()
    assert unpatch(model, merge_adapters=True) == 1
    assert not moe.lora.adapter_modules(model) and not any(isinstance(m, HFMoEBlock) for m in model.modules())
    assert not hasattr(model, moe.lora.apply.POOLS_ATTR)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = loaded(input_ids=IDS).logits
        assert_close(out, logits)
        assert not torch.allclose(out, base_logits(input_ids=IDS).logits, atol=1e-3)  # the adapters count


def test_merge_lora_moe_alone_keeps_the_patched_model_outputs() -> None:
    model = adapted_model("topk")
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert moe.lora.merge_lora_moe(model) == len([n for n, _ in model.named_modules() if n.endswith("q_proj")]) + 2
        assert_close(model(input_ids=IDS).logits, logits)


def test_unmerged_adapters_are_refused_with_the_fix() -> None:
    model = adapted_model("topk")
    with pytest.raises(ValueError, match="merge_adapters=True"):
        unpatch(model)
    assert moe.lora.adapter_modules(model) and any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_routed_adapters_cannot_be_merged_and_change_nothing() -> None:
    model = adapted_model("topk", experts=2)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    with pytest.raises(ValueError, match="routed LoRA-MoE.*save_lora_moe"):
        unpatch(model, merge_adapters=True)
    assert len(moe.lora.routed_adapters(model)) == len(moe.lora.adapter_modules(model))
    assert any(isinstance(m, HFMoEBlock) for m in model.modules())
    with torch.no_grad():
        assert_close(model(input_ids=IDS).logits, logits)
