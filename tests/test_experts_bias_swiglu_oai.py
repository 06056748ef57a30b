"""Experts with biases and GPT-OSS's clamped SwiGLU ("swiglu_oai"): the grouped path equals a
per-expert loop written from the definition, forward and gradients, on every CPU backend."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import moe
from moe.experts import Experts


def loop_reference(x_ND, counts_E, w_in, b_in, w_out, b_out, alpha, limit):  # type: ignore[no-untyped-def]
    """Per expert: (clamp(up) + 1) * g * sigmoid(alpha g) of x w_in + b_in, then @ w_out + b_out."""
    rows, start = [], 0
    for e, c in enumerate(counts_E.tolist()):
        h = x_ND[start : start + c] @ w_in[e] + b_in[e]
        half = h.shape[-1] // 2
        gate, up = h[:, :half].clamp(max=limit), h[:, half:].clamp(-limit, limit)
        rows.append(((up + 1) * gate * torch.sigmoid(alpha * gate)) @ w_out[e] + b_out[e])
        start += c
    pad = x_ND.new_zeros(x_ND.shape[0] - start, x_ND.shape[1])
    return torch.cat([*rows, pad])


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_bias_swiglu_oai_forward_and_grads_match_the_loop(backend: str) -> None:
    torch.manual_seed(0)
    experts = Experts(4, 16, 12, "swiglu_oai", backend, bias=True, alpha=1.702, limit=1.5)
    with torch.no_grad():
        experts.w_in.mul_(4.0)  # some pre-activations past the limit: the clamp matters
        experts.b_in.normal_()
        experts.b_out.normal_()
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(12, 16, requires_grad=True)  # 2 padding rows past counts.sum()
    params = [experts.w_in, experts.b_in, experts.w_out, experts.b_out]
    x_ref = x.detach().clone().requires_grad_(True)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    y = experts(x, counts)
    ref = loop_reference(x_ref, counts, *ref_params, 1.702, 1.5)
    assert torch.equal(y[10:], torch.zeros_like(y[10:]))
    assert_close(y, ref)
    cotangent = torch.randn_like(y)
    grads = torch.autograd.grad((y * cotangent).sum(), [x, *params])
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), [x_ref, *ref_params])
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close(got, want)
    assert not experts.supports_fused(torch.device("cpu"))


def test_moe_layer_options_and_their_limits() -> None:
    layer = moe.MoE(16, 8, 4, 2, activation="swiglu_oai", expert_bias=True, swiglu_limit=3.0, bias=True)
    assert layer.experts.b_in is not None and layer.router.bias is not None and layer.experts.limit == 3.0
    assert layer(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    assert moe.MoE.from_config(layer.config).config == layer.config
    plain = moe.MoE(16, 8, 4, 2)
    assert plain.experts.b_in is None and "experts.b_in" not in plain.state_dict()
    with pytest.raises(ValueError, match="shared experts"):
        moe.MoE(16, 8, 4, 2, activation="swiglu_oai", num_shared_experts=1)
    with pytest.raises(ValueError, match="swiglu_limit"):
        moe.MoE(16, 8, 4, 2, activation="swiglu_oai", swiglu_limit=0.0)
