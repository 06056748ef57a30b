"""Residual MoE (DeepSpeed-MoE's use_residual=True): config, forward formula and gradients with every
router and CPU backend, shared experts, autocast, expert parallelism on gloo ranks vs one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import moe
from moe.layer import residual_mix
from moe.ops import registry

D, H, E, K = 8, 12, 4, 2
ROUTERS = ["topk", "aux_free", "recurrent", "expert_choice"]


def _dtype(router: str) -> torch.dtype:
    # The recurrent router's GRU does not run in fp64 (a limitation of that router, not of Residual MoE).
    return torch.float32 if router == "recurrent" else torch.float64


def _routed_only(layer: moe.MoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer without its dense branch (residual=False, weights shared)."""
    cfg = dataclasses.replace(layer.config, residual=False, residual_hidden_dim=None)
    plain = moe.MoE.from_config(cfg).to(x.dtype)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("residual_")}
    plain.load_state_dict(state)
    return plain(x)


@pytest.mark.parametrize("router", ROUTERS)
def test_residual_forward_is_deepspeeds_mix(router: str) -> None:
    torch.manual_seed(0)
    layer = moe.MoE(D, H, E, K, router, residual=True).to(_dtype(router))
    x = torch.randn(2, 5, D, dtype=_dtype(router))
    moe_out = _routed_only(layer, x)
    mlp_out = layer.residual_mlp(x)
    coef = torch.softmax(layer.residual_coef(x), dim=-1)
    torch.testing.assert_close(layer(x), moe_out * coef[..., 0:1] + mlp_out * coef[..., 1:])


@pytest.mark.parametrize("router", ROUTERS)
def test_residual_gradients(router: str) -> None:
    """Gradients of the input and of every weight equal those of the explicit formula built from
    the plain layer; the dense-branch weights also match finite differences (fp64)."""
    torch.manual_seed(0)
    dtype = _dtype(router)
    layer = moe.MoE(D, H, E, K, router, residual=True, residual_hidden_dim=6, num_shared_experts=1).to(dtype)
    plain = moe.MoE.from_config(dataclasses.replace(layer.config, residual=False, residual_hidden_dim=None)).to(dtype)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("residual_")})
    x = torch.randn(7, D, dtype=dtype)
    g = torch.randn(7, D, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (layer(x1) * g).sum().backward()
    coef = torch.softmax(layer.residual_coef(x2), dim=-1)
    want = plain(x2) * coef[..., 0:1] + layer.residual_mlp(x2) * coef[..., 1:]
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    dense = [grads[n] for n in grads if n.startswith("residual_")]
    layer.zero_grad()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    for p, d in zip([*layer.residual_mlp.parameters(), *layer.residual_coef.parameters()], dense, strict=True):
        torch.testing.assert_close(p.grad, d)
    if dtype != torch.float64:
        return
    eps = 1e-6
    for p, d in zip(
        [layer.residual_mlp.up_proj.weight, layer.residual_coef.weight, layer.residual_coef.bias],
        [dense[1], dense[3], dense[4]],
        strict=True,
    ):
        i = (0,) * p.dim()
        with torch.no_grad():
            p[i] += eps
            up = (layer(x) * g).sum()
            p[i] -= 2 * eps
            down = (layer(x) * g).sum()
            p[i] += eps
        torch.testing.assert_close(d[i], (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", "cpp", "torch"])
def test_residual_backends_agree(backend: str) -> None:
    if not registry.resolve("grouped_mm", backend, torch.device("cpu")):  # pragma: no cover
        pytest.skip(f"{backend} unavailable")
    torch.manual_seed(0)
    ref = moe.MoE(D, H, E, K, residual=True, backend="reference")
    other = moe.MoE(D, H, E, K, residual=True, backend=backend)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(9, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    other(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_residual_config_and_errors() -> None:
    cfg = moe.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=K, residual=True)
    assert cfg.residual_dim == H
    layer = moe.MoE.from_config(cfg)
    assert layer.config.residual and layer.config.residual_dim == H and layer.residual_coef.bias is not None
    assert moe.MoE.from_config(dataclasses.replace(cfg, residual_hidden_dim=3)).residual_mlp.up_proj.out_features == 3
    assert moe.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=K).residual_dim == 0
    assert moe.MoE(D, H, E, K).residual_mlp is None
    with pytest.raises(ValueError, match="residual=True"):
        moe.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=K, residual_hidden_dim=4)
    with pytest.raises(TypeError, match="residual must be a bool"):
        moe.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=K, residual=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="residual_hidden_dim must be >= 1"):
        moe.MoE(D, H, E, K, residual=True, residual_hidden_dim=0)
    # A residual layer's weights do not silently load into a layer without a dense branch.
    with pytest.raises(RuntimeError, match="residual_mlp"):
        moe.MoE(D, H, E, K).load_state_dict(layer.state_dict())


def test_residual_mix_bf16_autocast_and_shared() -> None:
    torch.manual_seed(0)
    layer = moe.MoE(D, H, E, K, residual=True, num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(4, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y, layer(x), rtol=5e-2, atol=5e-2)
    mix = residual_mix(torch.ones(3, 2), torch.zeros(3, 2), torch.tensor([[0.0, 0.0]] * 3))
    torch.testing.assert_close(mix, torch.full((3, 2), 0.5))


# --- expert parallelism: the dense branch is replicated -------------------------------------


def _ep_residual_rank(rank: int, world: int) -> None:
    torch.manual_seed(0)
    single = moe.MoE(D, H, E, K, residual=True, num_shared_experts=1).double()
    layer = moe.MoE(D, H, E, K, residual=True, num_shared_experts=1, process_group=dist.group.WORLD).double()
    layer.load_state_dict({k: v for k, v in single.state_dict().items() if not k.startswith("experts.")}, strict=False)
    layer.experts.load_global(single.experts.w_in.detach(), single.experts.w_out.detach())
    g = torch.Generator().manual_seed(1)
    tokens = [5, 3, 6, 2][:world]
    xs = [torch.randn(t, D, generator=g, dtype=torch.float64) for t in tokens]
    gs = [torch.randn(t, D, generator=g, dtype=torch.float64) for t in tokens]
    x_all = torch.cat(xs).requires_grad_()
    y_all = single(x_all)
    (y_all * torch.cat(gs)).sum().backward()
    start = sum(tokens[:rank])
    sl = slice(start, start + tokens[rank])
    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    (y * gs[rank]).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-8)  # the router computes in fp32
    torch.testing.assert_close(y, y_all[sl].detach(), **tol)
    torch.testing.assert_close(x.grad, x_all.grad[sl], **tol)
    for (name, p), q in zip(layer.named_parameters(), single.parameters(), strict=True):
        if name.startswith("experts."):
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)  # replicated: the global batch's gradient is the sum over ranks
        torch.testing.assert_close(grad, q.grad, **tol, msg=name)


@pytest.mark.distributed
def test_residual_expert_parallel_two_ranks() -> None:
    from test_parallel import _spawn

    _spawn(_ep_residual_rank, 2)


@pytest.mark.slow
def test_residual_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = moe.MoE(16, 32, 4, 2, num_shared_experts=1, residual=True, backend="reference")
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    gx, gc = x.grad.clone(), layer.residual_coef.weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    yc = torch.compile(layer, fullgraph=True)(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.residual_coef.weight.grad, gc)


def test_residual_activation_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = moe.MoE(D, H, E, K, residual=True)
    x = torch.randn(6, D, requires_grad=True)
    layer(x).square().sum().backward()
    want = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for a, b in zip([p.grad for p in layer.parameters()] + [x.grad], want, strict=True):
        torch.testing.assert_close(a, b)


def test_lora_moe_adapts_the_dense_branch() -> None:
    """LoRA-MoE wraps the residual branch's Linear layers like any others; at init the adapters add 0."""
    from moe.lora import apply_lora_moe

    torch.manual_seed(0)
    model = torch.nn.ModuleList([moe.MoE(D, H, E, K, residual=True) for _ in range(2)])
    x = torch.randn(5, D)
    with torch.no_grad():
        want = model[1](model[0](x))
    apply_lora_moe(model, ["up_proj", "down_proj"], experts_per_layer=2, rank=2, top_k=1)
    assert type(model[0].residual_mlp.up_proj).__name__ != "Linear"
    y = model[1](model[0](x))
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("residual_mlp" in n for n in trainable)
