"""moe.integrations.transformers.patch on whole tiny transformers models (fp32, CPU).

The patched model must give the same logits, the same input-embedding gradients of the LM loss
and the same greedy generate() tokens as the unpatched one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from hf_tiny import TRANSFORMERS_5, block_class, tiny_config, transformers
from torch import nn

import moe
from moe.integrations.transformers import HFMoEBlock, from_hf, patch

# family -> MoE blocks expected in the 2-layer model (Qwen2-MoE and DeepSeek keep one dense layer).
EXPECTED_BLOCKS = {
    "mixtral": 2,
    "qwen2_moe": 1,
    "qwen3_moe": 2,
    "olmoe": 2,
    "deepseek_v3": 1,
    "deepseek_v2": 1,
    "deepseek_v2_group": 1,
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
    # only 4.57's Mixtral/Qwen/OLMoE blocks return (hidden, router_logits); the wrappers keep that
    legacy_tuple = not TRANSFORMERS_5 and not family.startswith("deepseek")
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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_patch_turns_off_hf_router_logits_with_a_warning(family: str) -> None:
    """HF's own balance loss would index router logits the patched blocks no longer record."""
    model = tiny_model(family).train()
    model.config.output_router_logits = True
    with pytest.warns(UserWarning, match="output_router_logits"):
        patch(model, aux_loss_coef=1e-2)
    ids = torch.randint(3, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and moe.aux_loss(model) > 0
