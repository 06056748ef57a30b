"""DynMoLE's Tsallis entropy and selection rule, and the batched LoRA experts vs a per-expert loop."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.lora import (
    DynMoLERouter,
    LoRAMoELinear,
    dynmole_select,
    max_tsallis_entropy,
    normalized_tsallis_entropy,
    tsallis_entropy,
)

torch.set_num_threads(1)


def test_tsallis_entropy_matches_formula() -> None:
    p = torch.softmax(torch.randn(5, 6, dtype=torch.float64), -1)
    q, eps = 1.1, 1e-5
    expected = [(1 - sum((float(v) + eps) ** q for v in row)) / (q - 1) for row in p]
    torch.testing.assert_close(tsallis_entropy(p), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    s_max = (1 - 6 * (1 / 6 + eps) ** q) / (q - 1)
    assert max_tsallis_entropy(6) == pytest.approx(s_max, rel=1e-14)
    uniform = torch.full((1, 6), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(normalized_tsallis_entropy(uniform), torch.ones(1, dtype=torch.float64))
    one_hot = torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    assert float(normalized_tsallis_entropy(one_hot)) < 0.01
    assert bool((normalized_tsallis_entropy(p) <= 1 + 1e-12).all())


def _rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _mask(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize(
    "probs, expected",
    [
        # low entropy: top-1 alone crosses 0.75 -> still the top 2
        (_rows([0.9, 0.05, 0.03, 0.02]), _mask([1, 1, 0, 0])),
        # cumulative 0.375, 0.6875, 0.8125: the third crosses 0.75 -> top 2
        (_rows([0.0625, 0.375, 0.3125, 0.125, 0.125]), _mask([0, 1, 1, 0, 0])),
        # exactly 0.75 after three experts (dyadic, exact in fp): the one landing on 0.75 is kept
        (_rows([0.5, 0.125, 0.125, 0.0625, 0.0625, 0.0625, 0.0625]), _mask([1, 1, 1, 0, 0, 0, 0])),
        # ties: stable descending order keeps the lower index among equals
        (_rows([0.1, 0.6, 0.1, 0.1, 0.1]), _mask([1, 1, 0, 0, 0])),
        # high entropy (uniform, and near-uniform with ties): every expert
        (_rows([0.25, 0.25, 0.25, 0.25]), _mask([1, 1, 1, 1])),
        (_rows([0.3, 0.3, 0.2, 0.2]), _mask([1, 1, 1, 1])),
        # E = 1 and E = 2: all experts
        (_rows([1.0]), _mask([1])),
        (_rows([0.99, 0.01]), _mask([1, 1])),
    ],
)
def test_dynmole_selection_rule(probs: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(dynmole_select(probs), expected)
    assert torch.equal(dynmole_select(probs.float()), expected)


def test_dynmole_selection_entropy_threshold_boundary() -> None:
    probs = _rows([0.6, 0.2, 0.1, 0.1])
    h = float(normalized_tsallis_entropy(probs))
    assert 0.5 < h < 0.95
    assert torch.equal(dynmole_select(probs, entropy_threshold=h - 1e-9), _mask([1, 1, 1, 1]))
    assert torch.equal(dynmole_select(probs, entropy_threshold=h), _mask([1, 1, 0, 0]))  # "> threshold"


def test_dynmole_router_weights_and_losses() -> None:
    router = DynMoLERouter(dim=6, num_experts=5).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    routing = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    mask = dynmole_select(probs)
    assert torch.equal(routing.expert_ids, torch.where(mask, torch.arange(5), -1))
    torch.testing.assert_close(routing.weights, probs * mask)  # not renormalised
    tsallis = 0.01 * tsallis_entropy(probs).mean()
    balance = 0.001 * 5 * ((probs * mask).mean(0) * probs.mean(0)).sum()
    torch.testing.assert_close(routing.aux_losses["tsallis"], tsallis)
    torch.testing.assert_close(routing.aux_losses["balance"], balance)
    (routing.aux_losses["tsallis"] + routing.aux_losses["balance"]).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def naive_lora_moe(layer: LoRAMoELinear, x_TD: torch.Tensor) -> torch.Tensor:
    """base(x) + scaling * sum over selected experts of w * (x A_e) B_e, one token and expert at a time."""
    routing = layer.router(x_TD) if layer.router is not None else None
    rows = []
    for t in range(x_TD.shape[0]):
        acc = layer.base(x_TD[t])
        for k in range(routing.expert_ids.shape[1] if routing is not None else 1):
            e = int(routing.expert_ids[t, k]) if routing is not None else 0
            if e < 0:
                continue
            w = routing.weights[t, k].to(x_TD.dtype) if routing is not None else 1.0
            acc = acc + layer.scaling * w * ((x_TD[t] @ layer.lora_A[e]) @ layer.lora_B[e])
        rows.append(acc)
    return torch.stack(rows) if rows else layer.base(x_TD)


@pytest.mark.parametrize("router", ["topk", "dynmole"])
@pytest.mark.parametrize("compute", ["dense", "grouped"])
@pytest.mark.parametrize(
    "tokens, dim, out, experts, top_k", [(0, 8, 6, 4, 2), (1, 8, 6, 4, 2), (13, 10, 7, 5, 3), (9, 6, 5, 1, 1)]
)
def test_batched_experts_match_per_expert_loop(
    router: str, compute: str, tokens: int, dim: int, out: int, experts: int, top_k: int
) -> None:
    base = torch.nn.Linear(dim, out).double().requires_grad_(False)
    layer = LoRAMoELinear(base, experts, rank=3, alpha=5.0, router=router, top_k=top_k, balance_coef=1e-3)  # type: ignore[arg-type]
    layer.compute = compute  # type: ignore[assignment]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(tokens, dim, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B] + ([layer.router.weight] if layer.router is not None else [])
    y = layer(x)
    y_ref = naive_lora_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None or float(g.abs().sum()) == 0.0
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    if experts > 1 and tokens > 0:
        assert set(layer.aux_losses) >= {"balance"}
        assert torch.equal(moe.aux_loss(layer), sum(layer.aux_losses.values()))


def test_unselected_experts_get_zero_grad_in_dense_path() -> None:
    base = torch.nn.Linear(8, 8).double().requires_grad_(False)
    layer = LoRAMoELinear(base, 6, rank=2, alpha=2.0, router="topk", top_k=1, compute="dense")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.zero_()  # type: ignore[union-attr]
        layer.router.weight[3] = 10.0  # type: ignore[union-attr]
    x = torch.rand(5, 8, dtype=torch.float64) + 0.1
    layer(x).sum().backward()
    used = layer.lora_A.grad.abs().sum((1, 2)) > 0  # type: ignore[union-attr]
    assert used.tolist() == [False, False, False, True, False, False]
