"""Each router's math against the formulas of REFERENCES.md, on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moe
from moe.config import AuxFreeConfig, ExpertChoiceConfig, RecurrentConfig, TopKConfig
from moe.routing import AuxFreeRouter, ExpertChoiceRouter, RecurrentRouter, TopKRouter
from moe.routing.aux_free import group_limited_topk
from moe.routing.losses import balance_loss, sequence_balance_loss, z_loss


def _router_with_logits(router: torch.nn.Module, logits_TE: torch.Tensor) -> torch.Tensor:
    """Sets W = I (D = E) so that logits == x; returns x."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(logits_TE.shape[1]))
    return logits_TE.clone()


def test_topk_weights_are_renormalised_softmax_topk() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    for norm in (True, False):
        r = TopKRouter(4, 4, 2, TopKConfig(norm_topk_prob=norm, aux_loss_coef=0))
        out = r(_router_with_logits(r, logits))
        p = F.softmax(logits, -1)
        assert out.expert_ids.tolist() == [[0, 1], [2, 3]]
        w = torch.stack([p[0, [0, 1]], p[1, [2, 3]]])
        torch.testing.assert_close(out.weights, w / w.sum(-1, keepdim=True) if norm else w)
        torch.testing.assert_close(out.probs, p)


def test_balance_loss_formula_and_balanced_value_is_one() -> None:
    probs = torch.full((4, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert balance_loss(probs, ids).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]])
    ids = torch.tensor([[0, 1], [0, 1], [0, 2]])
    f = torch.tensor([3, 2, 1, 0]) / 6.0
    expected = 4 * (f * probs.mean(0)).sum()
    assert balance_loss(probs, ids).item() == pytest.approx(expected.item())
    mask = torch.tensor([True, True, False])
    f_m = torch.tensor([2, 2, 0, 0]) / 4.0
    expected_m = 4 * (f_m * probs[:2].mean(0)).sum()
    assert balance_loss(probs, ids, mask).item() == pytest.approx(expected_m.item())


def test_z_loss_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert z_loss(logits).item() == pytest.approx(expected.item())


def test_topk_router_losses_are_weighted_by_their_coefficients() -> None:
    r = TopKRouter(4, 4, 2, TopKConfig(aux_loss_coef=0.1, z_loss_coef=0.01))
    x = torch.randn(6, 4)
    out = r(x)
    logits = x @ r.weight.t()
    p = F.softmax(logits, -1)
    torch.testing.assert_close(out.aux_losses["balance"], 0.1 * balance_loss(p, out.expert_ids))
    torch.testing.assert_close(out.aux_losses["z"], 0.01 * z_loss(logits))


def test_jitter_only_in_training() -> None:
    r = TopKRouter(8, 4, 2, TopKConfig(jitter=0.5))
    x = torch.randn(50, 8)
    r.eval()
    assert torch.equal(r(x).weights, r(x).weights)
    r.train()
    assert not torch.equal(r(x).weights, r(x).weights)


def test_aux_free_selects_on_biased_scores_but_weights_use_unbiased() -> None:
    cfg = AuxFreeConfig(routed_scaling_factor=2.5, norm_topk_prob=True)
    r = AuxFreeRouter(4, 4, 2, cfg)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    x = _router_with_logits(r, logits)
    r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    out = r(x)
    assert sorted(out.expert_ids[0].tolist()) == [0, 2]
    s = torch.sigmoid(logits[0, [0, 2]])
    torch.testing.assert_close(out.weights[0].sort().values, (2.5 * s / s.sum()).sort().values)


def test_group_limited_selection_masks_with_minus_inf() -> None:
    # 4 groups of 2. Biased scores are negative: a 0.0 fill (the transformers 4.57 bug) would
    # let a masked expert win; -inf never does.
    choice = torch.tensor([[-0.9, -0.8, -0.1, -0.2, -0.7, -0.9, -0.3, -0.3]])
    ids = group_limited_topk(choice, top_k=3, n_group=4, topk_group=2)
    # group sums: g0 -1.7, g1 -0.3, g2 -1.6, g3 -0.6 -> keep g1 and g3
    assert sorted(ids[0].tolist()) == [2, 3, 6]


def test_aux_free_bias_update_rule_and_not_trained_by_autograd() -> None:
    r = AuxFreeRouter(4, 4, 1, AuxFreeConfig(bias_update_rate=0.1))
    assert not any(n == "e_score_correction_bias" for n, _ in r.named_parameters())
    x = _router_with_logits(r, torch.tensor([[5.0, 0, 0, 0]] * 3 + [[0, 5.0, 0, 0]]))
    r.train()
    r(x)
    assert r.pending_load.tolist() == [3, 1, 0, 0]
    r.update()  # mean load 1: b += 0.1 * sign(1 - load)
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    assert r.pending_load.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aux_free_bias_stays_fp32_when_the_layer_is_cast(dtype: torch.dtype) -> None:
    layer = moe.MoE(16, 8, 4, 1, "aux_free", bias_update_rate=1e-3).to(dtype)
    r = layer.router
    assert r.weight.dtype == dtype and r.e_score_correction_bias.dtype == torch.float32
    r.e_score_correction_bias.fill_(0.5)
    r.pending_load.copy_(torch.tensor([4, 0, 0, 0]))
    r.update()  # a 1e-3 step from 0.5 is below half a bf16 ulp: it must not be rounded away
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([0.499, 0.501, 0.501, 0.501]))
    assert layer.double().router.e_score_correction_bias.dtype == torch.float64  # wider stays wider


def test_aux_free_bias_moves_skewed_loads_toward_balance() -> None:
    layer = moe.MoE(16, 8, 8, 2, "aux_free", bias_update_rate=0.02)
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.router.weight[0] += 2.0  # a popular expert
    x = torch.randn(256, 16) + 0.5
    layer(x)
    before = layer.stats.max_violation
    for _ in range(100):
        layer(x)
        moe.update_routers(layer)
    layer(x)
    assert before > 1.0
    assert layer.stats.max_violation < 0.5 * before


def test_sequence_balance_loss_formula() -> None:
    scores = torch.rand(6, 4)
    ids = torch.tensor([[0, 1], [0, 2], [3, 1], [0, 1], [2, 2], [1, 3]])
    got = sequence_balance_loss(scores, ids, seq_len=3)
    total = 0.0
    for seq in range(2):
        s = scores[seq * 3 : seq * 3 + 3]
        counts = torch.bincount(ids[seq * 3 : seq * 3 + 3].reshape(-1), minlength=4).float()
        f = 4 / (2 * 3) * counts
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        total += (f * p).sum().item()
    assert got.item() == pytest.approx(total / 2)


def test_expert_choice_each_expert_takes_capacity_tokens() -> None:
    r = ExpertChoiceRouter(8, 4, 2, ExpertChoiceConfig(capacity_factor=2.0))
    x = torch.randn(10, 8)
    out = r(x)
    c = math.ceil(10 * 2.0 / 4)
    chosen = out.expert_ids >= 0
    assert chosen.sum(0).tolist() == [c] * 4
    assert out.max_copies == 4 * c
    p = F.softmax(x @ r.weight.t(), -1)
    for e in range(4):
        assert set(torch.nonzero(chosen[:, e]).flatten().tolist()) == set(p[:, e].topk(c).indices.tolist())
    torch.testing.assert_close(out.weights, torch.where(chosen, p, 0.0))


def _stack(n_layers: int, **kw) -> torch.nn.Sequential:
    layers = torch.nn.Sequential(*[moe.MoE(8, 16, 4, 2, "recurrent", recurrent_dim=6, **kw) for _ in range(n_layers)])
    moe.tie_recurrent_routers(layers)
    return layers


def test_recurrent_router_formula_for_first_two_layers() -> None:
    model = _stack(2)
    x = torch.randn(5, 8)
    r0, r1 = model[0].router, model[1].router
    out0 = r0(x)
    out1 = r1(x)
    cell = r0.core.cell
    h0 = cell(r0.proj_in(x), torch.zeros(5, 6))
    h1 = cell(r1.proj_in(x), h0)
    torch.testing.assert_close(out0.probs, F.softmax(h0 @ r0.proj_out.weight.t(), -1))
    torch.testing.assert_close(out1.probs, F.softmax(h1 @ r1.proj_out.weight.t(), -1))
    assert r0.core is r1.core and r0.layer_index == 0 and r1.layer_index == 1


def test_recurrent_gradients_reach_first_router_through_the_chain() -> None:
    model = _stack(3)
    x = torch.randn(5, 8)
    model[0](x)
    model[1](x)
    routing = model[2].router(x)  # only the last layer's routing in the loss
    routing.weights.sum().backward()
    assert model[0].router.proj_in.weight.grad.abs().sum() > 0
    assert model[0].router.core.cell.weight_hh.grad.abs().sum() > 0


def test_recurrent_state_is_safe_under_activation_checkpointing() -> None:
    torch.manual_seed(1)
    model = _stack(3)
    x = torch.randn(2, 5, 8, requires_grad=True)

    def run(ckpt: bool) -> dict[str, torch.Tensor]:
        h = x
        for layer in model:
            h = h + (checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h))
        model.zero_grad()
        x.grad = None
        (h.square().sum() + moe.aux_loss(model)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads["x"] = x.grad.clone()
        return grads

    plain, ckpt = run(False), run(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_recurrent_checkpointing_with_two_forwards_before_backward() -> None:
    """Gradient accumulation over two batches in one backward: each recomputation must use
    its own pass's recurrent state (one slot per layer gave the second pass's to both)."""
    torch.manual_seed(1)
    model = _stack(3)
    xs = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]

    def run(ckpt: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss = torch.zeros(())
        for x in xs:
            h = x
            for layer in model:
                h = h + (checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h))
            loss = loss + h.square().sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_recurrent_out_of_order_call_is_a_clear_error() -> None:
    model = _stack(2)
    with pytest.raises(RuntimeError, match="ran before router 0"):
        model[1](torch.randn(3, 8))


def test_two_models_keep_separate_recurrent_state() -> None:
    a, b = _stack(2), _stack(2)
    x = torch.randn(4, 8)
    y_a = a(x)
    b(torch.randn(7, 8))  # interleaved pass of another model
    torch.testing.assert_close(a(x), y_a)


def test_recurrent_config_is_used_by_name() -> None:
    layer = moe.MoE(8, 16, 4, 2, "recurrent", router_config=RecurrentConfig(recurrent_dim=5))
    assert isinstance(layer.router, RecurrentRouter) and layer.router.core.cell.hidden_size == 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_recurrent_router_runs_in_the_model_dtype(dtype: torch.dtype) -> None:
    """An fp64 or bf16 layer with the recurrent router (it used to fail: fp32 input, other-dtype GRU)."""
    torch.manual_seed(0)
    ref = moe.MoE(8, 16, 4, 2, router="recurrent")
    layer = moe.MoE(8, 16, 4, 2, router="recurrent").to(dtype)
    layer.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(6, 8)
    xd = x.to(dtype).requires_grad_()
    y = layer(xd)
    y.sum().backward()
    assert y.dtype == dtype and xd.grad is not None and torch.isfinite(xd.grad.float()).all()
    if dtype == torch.float64:  # same routing and output as the fp32 layer, to fp32 precision
        torch.testing.assert_close(y.float(), ref(x), rtol=1e-4, atol=1e-5)
