"""Router.probe: the routing forward gives (eval mode), without side effects; predict.py uses it."""

from __future__ import annotations

import warnings

import pytest
import torch

from moe import MoE
from moe.config import AuxFreeConfig
from moe.lora.dynmole import DynMoLERouter
from moe.offload.predict import forecast, route
from moe.routing import AuxFreeRouter, Router, Routing, TopKRouter


def _router(kind: str) -> Router:
    if kind == "dynmole":
        return DynMoLERouter(16, 8)
    if kind == "aux_free_groups":
        return AuxFreeRouter(16, 16, 4, AuxFreeConfig(n_group=4, topk_group=2))
    return MoE(16, 8, 8, 2, router=kind).router


def _state(router: Router) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in router.state_dict(keep_vars=False).items()} | {
        f"buffer:{k}": b.clone() for k, b in router.named_buffers()
    }


@pytest.mark.parametrize("kind", ["topk", "aux_free", "aux_free_groups", "recurrent", "expert_choice", "dynmole"])
@pytest.mark.parametrize("training", [False, True])
def test_probe_is_forward_routing_without_side_effects(kind: str, training: bool) -> None:
    torch.manual_seed(0)
    router = _router(kind).train(training)
    if isinstance(router, AuxFreeRouter):
        with torch.no_grad():
            router.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(11, 16)
    before = _state(router)
    rng = torch.get_rng_state()
    probs, ids = router.probe(x)
    assert torch.equal(torch.get_rng_state(), rng), "probe drew random numbers"
    after = _state(router)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not probs.requires_grad and probs.dtype == torch.float32 and ids.dtype == torch.int64
    if kind == "recurrent":  # the chain is untouched: the forward after a probe is the one without
        assert router.core._last_index == -1 and router.core._h_last is None  # type: ignore[union-attr]
    with torch.no_grad():
        routing: Routing = router.eval()(x)
    assert routing.probs is not None
    torch.testing.assert_close(probs, routing.probs.float())
    assert torch.equal(ids, routing.expert_ids)
    # The gate weights follow from probs and ids for the top-k softmax routers.
    if kind == "topk":
        w = probs.gather(1, ids)
        torch.testing.assert_close(w / w.sum(-1, keepdim=True), routing.weights)


def test_recurrent_probe_reads_the_chain_state_of_the_pass() -> None:
    from moe.routing import RecurrentRouter, tie_recurrent_routers

    torch.manual_seed(0)
    model = torch.nn.ModuleList([MoE(16, 8, 8, 2, router="recurrent") for _ in range(2)]).eval()
    tie_recurrent_routers(model)
    r0, r1 = (m.router for m in model)
    assert isinstance(r1, RecurrentRouter) and not r1.probe_standalone
    x0, x1 = torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        r0(x0)
        probs, ids = r1.probe(x1)  # reads the state router 0 left, does not advance the chain
        assert r1.core._last_index == 0
        routing = r1(x1)
    torch.testing.assert_close(probs, routing.probs)
    assert torch.equal(ids, routing.expert_ids)
    with pytest.raises(RuntimeError, match="ran before router 0"):
        r1.core.reset()
        r1.probe(x1)


def test_aux_free_probe_counts_no_load_in_training() -> None:
    router = AuxFreeRouter(16, 8, 2).train()
    router.probe(torch.randn(7, 16))
    assert int(router.pending_load.sum()) == 0
    router(torch.randn(7, 16))
    assert int(router.pending_load.sum()) == 14


class _CosineRouter(Router):
    """A new router kind: cosine-similarity scores, top-k; implements probe."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = torch.nn.Parameter(torch.randn(num_experts, dim))

    def _probs(self, x_TD: torch.Tensor) -> torch.Tensor:
        normalize = torch.nn.functional.normalize
        cos = normalize(x_TD.float(), dim=-1) @ normalize(self.weight, dim=-1).t()
        return torch.softmax(4 * cos, dim=-1)

    def forward(self, x_TD, token_mask=None, seq_len=None):  # type: ignore[no-untyped-def]
        probs = self._probs(x_TD)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return Routing(ids, weights, {}, probs)

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self._probs(x_TD)
        return probs, probs.topk(self.top_k, dim=-1).indices


class _NoProbeRouter(_CosineRouter):
    probe = Router.probe  # a custom router that does not implement it


def test_predict_works_with_a_new_router_subclass() -> None:
    torch.manual_seed(0)
    routers = [_CosineRouter(16, 8, 2) for _ in range(3)]
    x = torch.randn(6, 16)
    probs, picked, ahead = forecast(routers, 0, x, lookahead=2)
    own_probs, own_ids = routers[0].probe(x)
    assert probs is not None and picked is not None
    torch.testing.assert_close(probs, own_probs.mean(0))
    assert picked.sum() == own_ids.numel()
    assert [t for t, _ in ahead] == [1, 2]
    # Mixed with a top-k router: the per-router path gives the same for the new one.
    mixed = [routers[0], TopKRouter(16, 8, 2), routers[2]]
    probs2, _, ahead2 = forecast(mixed, 0, x, lookahead=2)
    torch.testing.assert_close(probs2, probs)
    torch.testing.assert_close(ahead2[1][1], ahead[1][1])


def test_a_router_without_probe_warns_instead_of_silently_skipping() -> None:
    routers = [_NoProbeRouter(16, 8, 2), _NoProbeRouter(16, 8, 2)]
    x = torch.randn(4, 16)
    with pytest.warns(RuntimeWarning, match="does not implement probe"):
        assert forecast(routers, 0, x, lookahead=1) == (None, None, [])
    with pytest.raises(NotImplementedError, match="_NoProbeRouter does not implement Router.probe"):
        routers[0].probe(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class
        assert route(routers[1], x) is None
