"""The MoE layer against the per-token oracle: forward and every gradient, over SHAPES."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, assert_close
from oracle import per_token_moe

import moe


def _grads(layer: moe.MoE, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    out = {"x": grads[0]}
    for name, g in zip(params, grads[1:], strict=True):
        out[name] = g if g is not None else torch.zeros_like(params[name])
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_D{}_H{}_E{}_K{}".format(*s))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [0, 1])
def test_layer_matches_per_token_oracle(shape: tuple, activation: str, shared: int) -> None:
    t, d, h, e, k = shape
    layer = moe.MoE(d, h, e, k, activation=activation, num_shared_experts=shared, backend="reference").double()
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    routing = layer.router(x)
    y_ref = per_token_moe(layer, x, routing.expert_ids, routing.weights)
    assert_close(y, y_ref)
    dy = torch.randn_like(y)
    got, want = _grads(layer, x, y, dy), _grads(layer, x, y_ref, dy)
    for name in want:
        assert_close(got[name], want[name])


@pytest.mark.parametrize("router", ["topk", "aux_free", "recurrent", "expert_choice"])
def test_every_router_runs_forward_backward_on_3d_input(router: str) -> None:
    layer = moe.MoE(16, 24, 4, 2, router, num_shared_experts=1)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y.square().mean() + moe.aux_loss(layer)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.experts.w_in.grad is not None


def test_qwen_style_gated_shared_expert() -> None:
    layer = moe.MoE(8, 16, 4, 2, num_shared_experts=1, shared_expert_hidden_dim=12, shared_expert_gate=True).double()
    assert layer.shared_experts.up_proj.out_features == 12
    x = torch.randn(5, 8, dtype=torch.float64)
    r = layer.router(x)
    assert_close(layer(x), per_token_moe(layer, x, r.expert_ids, r.weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_fp32_layer(dtype: torch.dtype) -> None:
    layer = moe.MoE(16, 32, 4, 2)
    x = torch.randn(20, 16)
    ref = layer(x)
    half = layer.to(dtype)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    # Same routing (fp32 math on rounded inputs may flip near-ties; compare where it agrees).
    assert_close(y.float(), ref, dtype)


def test_autocast_keeps_input_dtype_out() -> None:
    layer = moe.MoE(16, 32, 4, 2)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    assert_close(y, layer(x), torch.bfloat16)


def test_capacity_drops_by_priority_and_counts() -> None:
    layer = moe.MoE(4, 8, 2, 1, capacity_factor=0.5).double()  # capacity = ceil(0.5 * 6 / 2) = 2
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.zeros(6, 4, dtype=torch.float64)
    x[:, 0] = 1.0  # every token prefers expert 0; only the first 2 fit
    y = layer(x)
    assert layer.stats.dropped_tokens == 4
    assert layer.stats.tokens_per_expert.tolist() == [6, 0]
    r = layer.router(x)
    kept = r.expert_ids.clone()
    kept[2:] = -1
    assert_close(y, per_token_moe(layer, x, kept, r.weights))
    assert torch.all(y[2:] == 0)


def test_capacity_prefers_first_choices_over_second() -> None:
    from moe.routing.capacity import apply_capacity

    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.ones(3, 2)
    kept, kept_w, dropped = apply_capacity(ids, w, 2, capacity=2)
    # Expert 0: first choices of tokens 0 and 2 win over token 1's second choice.
    # Expert 1: first choice of token 1, then token 0's second choice (earlier token).
    assert kept.tolist() == [[0, 1], [1, -1], [0, -1]]
    assert int(dropped) == 2 and kept_w[1, 1] == 0


def test_empty_input_returns_empty() -> None:
    layer = moe.MoE(8, 16, 4, 2, num_shared_experts=1)
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert layer.stats.max_violation == 0.0


@pytest.mark.parametrize("router", ["topk", "aux_free", "recurrent"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_nan_in_one_token_never_reaches_other_tokens(router: str, capacity_factor: float | None) -> None:
    layer = moe.MoE(8, 16, 4, 2, router, capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(9, 8)
    clean = layer(x)
    others = torch.arange(9) != 4
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[4, 3] = bad
        y = layer(x_bad)
        assert torch.isfinite(y[others]).all()
        if capacity_factor is None:
            # Dropless: identical up to BLAS blocking (segment sizes change with token 4's routing).
            torch.testing.assert_close(y[others], clean[others], rtol=1e-6, atol=1e-6)
        else:
            # With a capacity, the bad token is routed nowhere: it takes no other token's slot.
            from moe.routing.capacity import apply_capacity, expert_capacity

            r = layer.router(x)
            ids = r.expert_ids.clone()
            ids[4] = -1
            kept, w, _ = apply_capacity(ids, r.weights, 4, expert_capacity(9, 2, 4, capacity_factor))
            expected = per_token_moe(layer, x, kept, w)
            torch.testing.assert_close(y[others], expected[others], rtol=1e-6, atol=1e-6)


def test_stats_report_load_and_max_violation() -> None:
    layer = moe.MoE(4, 8, 4, 1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 5.0
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0
    layer(x)
    s = layer.stats
    assert s.tokens_per_expert.tolist() == [0, 0, 8, 0]
    assert s.max_violation == pytest.approx(3.0)  # (8 - 2) / 2
    assert s.dropped_tokens == 0


def test_token_mask_excludes_padding_from_loss_and_stats() -> None:
    layer = moe.MoE(8, 16, 4, 2, aux_loss_coef=1.0)
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    y = layer(x, token_mask=mask)
    assert int(layer.stats.tokens_per_expert.sum()) == 8 * 2
    loss_masked = moe.aux_loss(layer)
    y_real = layer(x[mask].unsqueeze(0))
    torch.testing.assert_close(moe.aux_loss(layer), loss_masked)
    torch.testing.assert_close(y[mask], y_real[0])


def test_padding_takes_no_capacity_slot() -> None:
    """Left padding comes first in capacity priority; it must not push real tokens out."""
    layer = moe.MoE(8, 16, 2, 1, capacity_factor=1.0)  # capacity 4 of the 8 copies per expert
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))  # every token to expert 0
    x = torch.rand(1, 8, 8) + 0.1
    mask = torch.tensor([[False] * 6 + [True] * 2])
    y = layer(x, token_mask=mask)
    assert layer.stats.dropped_tokens == 0
    assert bool((y[0, 6:].abs().sum(-1) > 0).all())
    dropless = moe.MoE(8, 16, 2, 1)
    dropless.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y[0, 6:], dropless(x[:, 6:])[0])


def test_from_config_round_trip() -> None:
    cfg = moe.MoEConfig(
        dim=8,
        hidden_dim=16,
        num_experts=4,
        top_k=2,
        router="aux_free",
        router_config=moe.AuxFreeConfig(n_group=2, topk_group=1),
        num_shared_experts=2,
    )
    layer = moe.MoE.from_config(cfg)
    assert layer.config == cfg
    assert layer.shared_experts.up_proj.out_features == 32
    assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_state_dict_round_trips_exactly() -> None:
    a = moe.MoE(8, 16, 4, 2, "aux_free", num_shared_experts=1)
    a.router.e_score_correction_bias.fill_(0.25)
    b = moe.MoE(8, 16, 4, 2, "aux_free", num_shared_experts=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("router", ["topk", "recurrent", "aux_free"])
def test_deepcopy_after_a_training_forward(router: str) -> None:
    """The EMA / evaluation-copy pattern: copies carry weights, not the last pass's graph."""
    import copy

    layer = moe.MoE(8, 16, 4, 2, router=router).train()
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    twin = copy.deepcopy(layer)
    assert twin.aux_losses == {}
    for a, b in zip(layer.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(twin(x), layer(x))
