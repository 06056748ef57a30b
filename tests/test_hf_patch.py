"""moe.integrations.transformers.patch on whole tiny transformers models (fp32, CPU).

The patched model must give the same logits, the same input-embedding gradients of the LM loss
and the same greedy generate() tokens as the unpatched one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close
from hf_tiny import TRANSFORMERS_5, block_class, tiny_config, transformers
from torch import nn

import moe
from moe.integrations.transformers import HFMoEBlock, from_hf, patch, scan, unpatch

# family -> MoE blocks expected in the 2-layer model (Qwen2-MoE and DeepSeek keep one dense layer).
EXPECTED_BLOCKS = {
    "mixtral": 2,
    "qwen2_moe": 1,
    "qwen3_moe": 2,
    "olmoe": 2,
    "deepseek_v3": 1,
    "deepseek_v2": 1,
    "deepseek_v2_group": 1,
    "glm4_moe": 1,
    "dots1": 1,
    "minimax": 2,
    "qwen3_next": 2,
    "jamba": 2,
    "granitemoe": 2,
    "granitemoeshared": 2,
    "phimoe": 2,
    "gpt_oss": 2,
    "exaone_moe": 1,
    "minicpm5_moe": 1,
    "solar_open": 2,
    "mellum": 2,
    "minimax_m2": 2,
    "granitemoe_swa": 2,
    "qwen3_5_moe": 2,
    "granitemoehybrid": 2,
    "ernie4_5_moe": 1,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for module in model.modules():  # DeepSeek-V3: a non-zero bias, so patch must carry it
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn_like(bias) * 0.1)
        for name, param in model.named_parameters():  # GPT-OSS: non-zero expert and router biases
            if name.endswith(("_proj_bias", "router.bias")):
                param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def embedding_grad(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d loss / d input embeddings) of the LM loss on ids."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None
    return out.logits.detach(), grad.clone()


@pytest.mark.parametrize("family", list(EXPECTED_BLOCKS))
def test_patched_model_matches_logits_grads_and_generate(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    logits_ref, grad_ref = embedding_grad(model, ids)
    with torch.no_grad():
        tokens_ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    hf_cls = block_class(family)

    assert patch(model) == EXPECTED_BLOCKS[family]
    assert not any(isinstance(m, hf_cls) for m in model.modules())
    wrappers = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(wrappers) == EXPECTED_BLOCKS[family]
    # 4.57's Mixtral/Qwen/OLMoE blocks and GPT-OSS return (hidden, router_*); the wrappers keep that
    legacy_tuple = (not TRANSFORMERS_5 and not family.startswith("deepseek")) or family == "gpt_oss"
    assert all(w.returns_router_logits == legacy_tuple for w in wrappers)
    assert all(not w.training for w in wrappers)  # the model's eval mode is kept

    logits, grad = embedding_grad(model, ids)
    assert_close(logits, logits_ref)
    assert_close(grad, grad_ref)
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, tokens_ref)
    assert tokens.shape[1] > ids.shape[1]


def test_patched_model_losses_and_router_updates() -> None:
    model = tiny_model("deepseek_v3").train()
    assert patch(model, seq_aux_loss_coef=1e-4) == 1
    (wrapper,) = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    bias_before = wrapper.moe.router.e_score_correction_bias.clone()
    model(input_ids=torch.randint(3, 64, (2, 9)))
    assert moe.aux_loss(model) > 0
    assert moe.update_routers(model) >= 1
    assert not torch.equal(wrapper.moe.router.e_score_correction_bias, bias_before)


def test_patch_counts_zero_and_rejects_a_bare_block() -> None:
    assert patch(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == 0
    block = block_class("olmoe")(tiny_config("olmoe"))
    with pytest.raises(ValueError, match="for a bare OlmoeSparseMoeBlock call from_hf"):
        patch(block)
    assert isinstance(from_hf(block), moe.MoE)


# Families whose HF CausalLM computes a load-balancing loss from output_router_logits.
AUX_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "minimax", "qwen3_next", "jamba", "granitemoe", "phimoe"]


@pytest.mark.parametrize("family", AUX_FAMILIES)
def test_output_router_logits_gives_hf_aux_loss_from_our_routers(family: str) -> None:
    model = tiny_model(family)
    model.config.output_router_logits = True
    ids = torch.randint(3, 64, (2, 9))
    ref = model(input_ids=ids, labels=ids)
    assert ref.aux_loss is not None and ref.aux_loss > 0
    patch(model)
    out = model(input_ids=ids, labels=ids)
    assert_close(out.aux_loss, ref.aux_loss)
    assert_close(out.loss, ref.loss)
    assert len(out.router_logits) == EXPECTED_BLOCKS[family]
    out.aux_loss.backward()
    routers = [m.moe.router.weight.grad for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert all(g is not None and g.abs().sum() > 0 for g in routers)  # the loss reaches our routers


@pytest.mark.parametrize("family", list(EXPECTED_BLOCKS))
def test_unpatch_save_pretrained_loads_into_the_hf_class(family: str, tmp_path: Path) -> None:
    """A patched, then changed (as by fine-tuning) model goes back to HF's classes and checkpoint names."""
    model = tiny_model(family)
    ids = torch.randint(3, 64, (2, 9))
    n = patch(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        logits = model(input_ids=ids).logits
    assert unpatch(model) == n
    assert sum(isinstance(m, block_class(family)) for m in model.modules()) == n
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, logits)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, logits)


def test_gpt_oss_is_converted_with_biases_and_swiglu_oai() -> None:
    model = tiny_model("gpt_oss")
    reports = scan(model)
    assert [(r.block_class, r.family, r.reason) for r in reports] == [("GptOssMLP", "GPT-OSS", None)] * 2
    assert patch(model, strict=True) == 2
    (layer, _) = [m.moe for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert layer.config.activation == "swiglu_oai" and layer.config.expert_bias
    assert layer.router.bias is not None and layer.experts.b_in is not None
    assert not layer.experts.supports_fused(torch.device("cpu"))


def test_scan_reports_an_unknown_block_and_patch_skips_it() -> None:
    class SomeNewMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(4, 2, bias=False)
            self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    model = nn.Sequential(SomeNewMoeBlock())
    (report,) = scan(model)
    assert report.family is None and "not a recognised" in str(report.reason)
    with pytest.warns(UserWarning, match="SomeNewMoeBlock"):
        assert patch(model) == 0


def test_a_known_unsupported_block_is_refused_with_its_reason() -> None:
    """Llama 4 weights each expert's input, not its output: patch names the block and says so."""
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    block = Llama4TextMoe(Llama4TextConfig(hidden_size=16, intermediate_size=24, num_local_experts=4))
    model = nn.Sequential(block)
    (report,) = scan(model)
    assert report.block_class == "Llama4TextMoe" and "input" in str(report.reason)
    with pytest.warns(UserWarning, match="Llama4TextMoe"):
        assert patch(model) == 0
    assert model[0] is block
    with pytest.raises(TypeError, match="Llama 4 scales"):
        patch(model, strict=True)


def test_jetmoe_blocks_without_an_experts_module_are_still_reported() -> None:
    """JetMoE's MoE MLP has no `experts` attribute: known by class name, it is reported, not silently kept."""
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.JetMoeConfig(
            hidden_size=32,
            intermediate_size=24,
            kv_channels=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            vocab_size=64,
        )  # fmt: skip
    )
    reasons = {r.block_class: r.reason for r in scan(model)}
    assert "JetMoeMoE" in reasons and "output bias" in str(reasons["JetMoeMoE"])
    with pytest.warns(UserWarning, match="JetMoeMoE"):
        assert patch(model) == 0
