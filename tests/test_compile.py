"""torch.compile and activation checkpointing keep the layer's results."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moe


@pytest.mark.slow
def test_compiled_layer_matches_eager_forward_and_backward() -> None:
    torch._dynamo.reset()
    layer = moe.MoE(16, 32, 4, 2, num_shared_experts=1, backend="reference")
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), layer.experts.w_in.grad.clone()
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    yc = compiled(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.experts.w_in.grad, gw)


@pytest.mark.parametrize("router", ["topk", "aux_free", "expert_choice"])
def test_activation_checkpointing_gives_same_gradients(router: str) -> None:
    layer = moe.MoE(16, 32, 4, 2, router, num_shared_experts=1, capacity_factor=None)
    x = torch.randn(11, 16, requires_grad=True)
    layer(x).square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
