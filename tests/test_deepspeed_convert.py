"""convert(): deepspeed.moe.layer.MoE <-> moe.MoE with the same weights, outputs and gradients (1 process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe
from moe.experts import MLP

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402

from moe.integrations.deepspeed_convert import (  # noqa: E402
    DeepSpeedStyleMoE,
    convert,
    from_deepspeed_layer,
    to_deepspeed,
    to_deepspeed_layer,
)

D, H, E = 8, 12, 4
TOL = dict(rtol=1e-5, atol=1e-6)


def _gelu_expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU(), nn.Linear(H, D, bias=False))


def _ds_layer(k: int, expert: nn.Module) -> DSMoE:
    torch.manual_seed(0)
    layer = DSMoE(D, expert, num_experts=E, k=k, drop_tokens=False, min_capacity=0, top2_2nd_expert_sampling=False)
    with torch.no_grad():  # deepcopy gave every expert the same weights: make them differ
        for p in layer.deepspeed_moe.experts.parameters():
            p.normal_(0, 0.3)
    return layer


def _outputs_and_grads(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y, l_aux, counts = layer(x)
    g = torch.Generator().manual_seed(3)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), l_aux.detach(), counts, x.grad


def _expert_grads_ours(layer: moe.MoE) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.experts.w_in.grad, layer.experts.w_out.grad


def _expert_grads_ds(layer: DSMoE, swiglu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    experts = list(layer.deepspeed_moe.experts.deepspeed_experts)
    if swiglu:
        w_in = [torch.cat([e.gate_proj.weight.grad.t(), e.up_proj.weight.grad.t()], 1) for e in experts]
        w_out = [e.down_proj.weight.grad.t() for e in experts]
    else:
        w_in = [e[0].weight.grad.t() for e in experts]
        w_out = [e[2].weight.grad.t() for e in experts]
    return torch.stack(w_in), torch.stack(w_out)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("expert", ["gelu_sequential", "swiglu_mlp"])
def test_convert_matches_deepspeed(k: int, expert: str) -> None:
    swiglu = expert == "swiglu_mlp"
    ds = _ds_layer(k, MLP(D, H, "swiglu") if swiglu else _gelu_expert())
    ours = from_deepspeed_layer(ds)
    assert (
        isinstance(ours, moe.MoE)
        and ours.config.top_k == k
        and ours.config.activation == ("swiglu" if swiglu else "gelu")
    )
    x = torch.randn(3, 7, D)  # T = 21: some experts get few tokens
    y_ds, aux_ds, counts_ds, gx_ds = _outputs_and_grads(ds, x)
    y, aux, counts, gx = _outputs_and_grads(ours, x)
    torch.testing.assert_close(y, y_ds, **TOL)
    torch.testing.assert_close(gx, gx_ds, **TOL)
    assert torch.equal(counts.cpu(), counts_ds.cpu())
    if k == 1:  # the Switch loss E * sum_i f_i P_i; DeepSpeed's top-2 loss counts first choices only
        torch.testing.assert_close(aux, aux_ds, **TOL)
    torch.testing.assert_close(ours.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, **TOL)
    for ours_g, ds_g in zip(_expert_grads_ours(ours), _expert_grads_ds(ds, swiglu), strict=True):
        torch.testing.assert_close(ours_g, ds_g, **TOL)


@pytest.mark.parametrize("k", [1, 2])
def test_to_deepspeed_round_trip(k: int) -> None:
    torch.manual_seed(1)
    ours = moe.MoE(D, H, E, k, norm_topk_prob=k == 2, aux_loss_coef=1.0)
    ds = to_deepspeed_layer(ours)
    back = from_deepspeed_layer(ds)
    x = torch.randn(2, 9, D)
    y_ds = ds(x)[0]
    torch.testing.assert_close(y_ds, ours(x), **TOL)
    torch.testing.assert_close(back(x)[0], y_ds, **TOL)
    for a, b in zip(back.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_convert_and_to_deepspeed_in_a_model() -> None:
    model = nn.ModuleDict({"a": _ds_layer(1, _gelu_expert()), "b": nn.Linear(D, D), "c": _ds_layer(2, _gelu_expert())})
    assert convert(model) == 2
    assert isinstance(model["a"], DeepSpeedStyleMoE) and isinstance(model["c"], DeepSpeedStyleMoE)
    assert to_deepspeed(model) == 2
    assert isinstance(model["a"], DSMoE) and isinstance(model["c"], DSMoE)


def test_used_token_zeroes_masked_tokens() -> None:
    ds = _ds_layer(1, _gelu_expert())
    ours = from_deepspeed_layer(ds)
    x = torch.randn(10, D)
    used = (torch.arange(10) % 3 != 0).float()
    y = ours(x, used)[0]  # (DeepSpeed 0.19.8's top-1 gate itself fails with used_token: topk(k=Tensor))
    torch.testing.assert_close(y[used == 1], ds(x)[0][used == 1], **TOL)  # dropless: tokens route alone
    assert torch.all(y[used == 0] == 0)
    assert int(ours.stats.tokens_per_expert.sum()) == int(used.sum())  # masked tokens are not counted


def test_unconvertible_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot convert expert module"):
        from_deepspeed_layer(_ds_layer(1, nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))))
    with pytest.raises(ValueError, match="ep_size=1"):
        from_deepspeed_layer(DSMoE(D, _gelu_expert(), num_experts=E, ep_size=2))
    with pytest.raises(ValueError, match="experts' width"):  # DeepSpeed's dense branch is the expert module
        to_deepspeed_layer(moe.MoE(D, H, E, 1, norm_topk_prob=False, residual=True, residual_hidden_dim=2 * H))
    with pytest.raises(ValueError, match="cannot convert expert module"):  # a residual mlp with biases
        layer = DSMoE(D, _gelu_expert(), num_experts=E, use_residual=True)
        layer.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
        from_deepspeed_layer(layer)
    with pytest.raises(ValueError, match="top-1 unnormalised"):
        to_deepspeed_layer(moe.MoE(D, H, E, 2, norm_topk_prob=False))
    with pytest.raises(ValueError, match="topk"):
        to_deepspeed_layer(moe.MoE(D, H, E, 2, router="aux_free"))
    with pytest.raises(TypeError, match="deepspeed.moe.layer.MoE"):
        from_deepspeed_layer(nn.Linear(D, D))
    with pytest.raises(ValueError, match="eval_capacity_factor"):  # one capacity factor here, two there
        from_deepspeed_layer(DSMoE(D, _gelu_expert(), num_experts=E, capacity_factor=1.0, eval_capacity_factor=4.0))


def _ds_residual_layer(k: int, expert: nn.Module) -> DSMoE:
    torch.manual_seed(0)
    layer = DSMoE(
        D,
        expert,
        num_experts=E,
        k=k,
        drop_tokens=False,
        min_capacity=0,
        top2_2nd_expert_sampling=False,
        use_residual=True,
    )
    with torch.no_grad():  # experts, the dense branch and the coefficient all differ
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _residual_grads(layer: nn.Module) -> list[torch.Tensor]:
    if isinstance(layer, moe.MoE):
        mlp, coef = layer.residual_mlp, layer.residual_coef
    else:
        mlp, coef = layer.mlp, layer.coefficient
    return [p.grad for p in mlp.parameters()] + [coef.weight.grad, coef.bias.grad]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("expert", ["gelu_sequential", "swiglu_mlp"])
def test_convert_residual_moe_matches_deepspeed(k: int, expert: str) -> None:
    """DeepSpeed's Residual MoE (use_residual=True): same outputs and gradients of every weight."""
    swiglu = expert == "swiglu_mlp"
    ds = _ds_residual_layer(k, MLP(D, H, "swiglu") if swiglu else _gelu_expert())
    ours = from_deepspeed_layer(ds)
    assert ours.config.residual and ours.config.residual_dim == H
    x = torch.randn(3, 7, D)
    y_ds, aux_ds, counts_ds, gx_ds = _outputs_and_grads(ds, x)
    y, aux, counts, gx = _outputs_and_grads(ours, x)
    torch.testing.assert_close(y, y_ds, **TOL)
    torch.testing.assert_close(gx, gx_ds, **TOL)
    assert torch.equal(counts.cpu(), counts_ds.cpu())
    torch.testing.assert_close(ours.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, **TOL)
    for ours_g, ds_g in zip(_expert_grads_ours(ours), _expert_grads_ds(ds, swiglu), strict=True):
        torch.testing.assert_close(ours_g, ds_g, **TOL)
    if swiglu:  # same parameter order (MLP on both sides)
        for ours_g, ds_g in zip(_residual_grads(ours), _residual_grads(ds), strict=True):
            torch.testing.assert_close(ours_g, ds_g, **TOL)
    else:
        ours_g, ds_g = _residual_grads(ours), _residual_grads(ds)
        torch.testing.assert_close(ours_g[0], ds_g[0], **TOL)  # up_proj <- Linear(D, H)
        torch.testing.assert_close(ours_g[1], ds_g[1], **TOL)  # down_proj <- Linear(H, D)
        torch.testing.assert_close(ours_g[2:], ds_g[2:], **TOL)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_residual_moe_round_trip(activation: str) -> None:
    torch.manual_seed(1)
    ours = moe.MoE(D, H, E, 2, activation=activation, residual=True, aux_loss_coef=1.0)
    with torch.no_grad():
        ours.residual_coef.bias.copy_(torch.tensor([0.3, -0.2]))
    ds = to_deepspeed_layer(ours)
    assert ds.use_residual
    back = from_deepspeed_layer(ds)
    x = torch.randn(2, 9, D)
    y_ds = ds(x)[0]
    torch.testing.assert_close(y_ds, ours(x), **TOL)
    torch.testing.assert_close(back(x)[0], y_ds, **TOL)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for a, b in zip(back.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model = nn.ModuleDict({"a": ds})
    assert convert(model) == 1 and model["a"].config.residual
