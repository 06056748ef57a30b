"""Cache policies on traces: Belady bounds every online policy; predictive beats LRU; trace files."""

from __future__ import annotations

import pytest
import torch

import moe.offload as mo
from moe.offload.cache import Residency
from moe.offload.engine import CacheEngine
from moe.offload.policies import LRU, Belady

TRACES = [
    mo.SyntheticConfig(num_layers=4, num_experts=16, top_k=2, tokens=60, seed=0),
    mo.SyntheticConfig(num_layers=4, num_experts=16, top_k=4, tokens=60, reuse=0.0, cross_layer=0.0, seed=1),
    mo.SyntheticConfig(num_layers=3, num_experts=8, top_k=2, tokens=80, zipf=2.0, token_identity=1.0, seed=2),
    mo.SyntheticConfig(num_layers=3, num_experts=32, top_k=8, tokens=40, reuse=0.95, cross_layer=0.95, seed=3),
]


@pytest.mark.parametrize("cfg", TRACES)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_bounds_every_online_policy(cfg: mo.SyntheticConfig, scope: str) -> None:
    trace = mo.synthetic_trace(cfg)
    for capacity in sorted({1, cfg.top_k, cfg.num_experts // 4 or 1, cfg.num_experts // 2}):
        belady = mo.simulate(trace, "belady", capacity, scope)
        for policy in ("lru", "lfu", "predictive"):
            online = mo.simulate(trace, policy, capacity, scope)
            assert belady.hit_rate >= online.hit_rate - 1e-12, (policy, capacity, belady, online)
            assert belady.requests == online.requests > 0


def test_predictive_beats_lru_with_cross_layer_correlation() -> None:
    cfg = mo.SyntheticConfig(num_layers=6, num_experts=32, top_k=4, tokens=120, cross_layer=0.95, reuse=0.8, seed=4)
    trace = mo.synthetic_trace(cfg)
    lru = mo.simulate(trace, "lru", capacity=8)
    pred = mo.simulate(trace, "predictive", capacity=8)
    # Prefetching from the next layers' routers hides misses: more experts are on the device when asked for.
    assert pred.ready_rate >= lru.ready_rate + 0.05, (pred, lru)
    assert pred.prefetch_hits > 0
    # With prefetch off, the router-score eviction alone does not lose to LRU here.
    assert mo.simulate(trace, "predictive", 8, lookahead=0).hit_rate >= lru.hit_rate - 0.01
    # Without cross-layer correlation the predictions are worse (fewer prefetch hits per prefetch).
    flat = mo.synthetic_trace(mo.SyntheticConfig(**{**cfg.__dict__, "cross_layer": 0.0}))
    flat_pred = mo.simulate(flat, "predictive", capacity=8)
    assert flat_pred.prefetch_hits / max(flat_pred.prefetches, 1) < pred.prefetch_hits / pred.prefetches


def test_global_lru_cyclic_sweep_scores_zero_per_layer_does_not() -> None:
    # Every layer uses the same two experts each token: a cyclic sweep over 2*L experts.
    layers, tokens = 4, 20
    trace = mo.Trace(layers, 4, torch.arange(layers).repeat(tokens), torch.tensor([[0, 1]]).repeat(layers * tokens, 1))
    cap = 1  # global: 4 experts in one pool < 8 used per token
    assert mo.simulate(trace, "lru", cap + 1, scope="layer").hit_rate > 0.9
    assert mo.simulate(trace, "lru", cap, scope="global").hit_rate == 0.0
    assert mo.simulate(trace, "belady", cap, scope="global").hit_rate > 0.3


def test_belady_rejects_other_sequences_and_online_needs_no_future() -> None:
    pol = Belady([(0, 1), (0, 2)])
    pol.touch((0, 1))
    with pytest.raises(ValueError, match="does not have"):
        pol.touch((0, 1))
    with pytest.raises(ValueError, match="offline"):
        mo.make_policy("belady")


def test_engine_one_expert_cache_streams_every_request() -> None:
    res = Residency(1, LRU(), num_layers=1)
    engine = CacheEngine(res, lambda layer: 1)
    order = list(engine.step(0, [3, 1, 2]))
    assert [e for e, _ in order] == [1, 2, 3] and res.stats.copies == 3 and res.peak_bytes == 1
    assert [e for e, _ in engine.step(0, [3, 1])] == [3, 1]  # the resident one first
    assert res.stats.hits == 1


def test_trace_file_round_trip(tmp_path) -> None:  # noqa: ANN001
    trace = mo.synthetic_trace(mo.SyntheticConfig(num_layers=3, num_experts=8, top_k=2, tokens=10, lookahead=2))
    path = str(tmp_path / "t.safetensors")
    trace.save(path)
    back = mo.Trace.load(path)
    assert torch.equal(back.experts_SM, trace.experts_SM) and torch.equal(back.layer_S, trace.layer_S)
    assert back.lookahead == 2 and back.probs_SE is not None
    torch.testing.assert_close(back.probs_SE, trace.probs_SE, atol=1e-3, rtol=1e-2)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own header error
        mo.Trace.load(str(tmp_path / "bad.safetensors"))


def test_recorder_on_native_model() -> None:
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[mo_layer() for _ in range(3)])
    with mo.TraceRecorder(layers, lookahead=1) as rec:
        layers(torch.randn(5, 16))
    trace = rec.trace()
    assert trace.num_steps == 3 and trace.num_layers == 3 and trace.lookahead == 1
    assert all(len(trace.needed(s)) >= 2 for s in range(3))
    assert mo.simulate(trace, "belady", 2).requests == mo.simulate(trace, "lru", 2).requests


def mo_layer() -> torch.nn.Module:
    from moe import MoE

    return MoE(16, 8, 8, 2)


def test_cost_model_picks_the_cheaper_path() -> None:
    slow_bus = mo.CostModel(h2d_bytes_per_s=1e9, cpu_flops=1e11, device_flops=1e14)
    fast_bus = mo.CostModel(h2d_bytes_per_s=1e12, cpu_flops=1e10, device_flops=1e14)
    expert_bytes, flops_per_row, act = 352 << 20, 2 * 3 * 4096 * 14336, 4096 * 2
    assert slow_bus.compute_on_cpu(expert_bytes, 1, flops_per_row, act)  # batch 1: Fiddler's case
    assert not slow_bus.compute_on_cpu(expert_bytes, 4096, flops_per_row, act)  # big prefill: copy
    assert not fast_bus.compute_on_cpu(expert_bytes, 1, flops_per_row, act)
    for rows in (1, 64, 4096):
        cost = min(
            slow_bus.copy_seconds(expert_bytes, rows, flops_per_row), slow_bus.cpu_seconds(rows, flops_per_row, act)
        )
        chosen = (
            slow_bus.cpu_seconds(rows, flops_per_row, act)
            if slow_bus.compute_on_cpu(expert_bytes, rows, flops_per_row, act)
            else slow_bus.copy_seconds(expert_bytes, rows, flops_per_row)
        )
        assert chosen == cost
    measured = mo.measure(torch.device("cpu"), dim=64, nbytes=1 << 16)
    assert measured.h2d_bytes_per_s > 0 and measured.cpu_flops > 0


def test_forecast_is_route_and_votes_in_one_read() -> None:
    from moe.offload.predict import forecast, route, votes

    torch.manual_seed(0)
    routers = [mo_layer().router for _ in range(4)]
    x = torch.randn(5, 16)
    probs, picked, ahead = forecast(routers, 1, x, lookahead=3)  # only layers 2 and 3 exist ahead
    own_probs, own_ids = route(routers[1], x)
    torch.testing.assert_close(probs, own_probs.mean(0))
    assert picked is not None and picked.sum() == own_ids.numel()
    assert set(picked.nonzero().flatten().tolist()) == set(own_ids.flatten().tolist())
    assert [t for t, _ in ahead] == [2, 3]
    for target, v in ahead:
        torch.testing.assert_close(v, votes(*route(routers[target], x)))
    assert forecast(routers, 3, x, lookahead=1)[2] == []


def test_recorder_steps_are_the_experts_the_layers_routed_to() -> None:
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[mo_layer() for _ in range(3)])
    x = torch.randn(7, 16)
    with mo.TraceRecorder(layers, lookahead=2) as rec:
        layers(x)
    trace = rec.trace()
    h = x
    for i, layer in enumerate(layers):
        routed = set(layer.router(h).expert_ids.flatten().tolist())
        assert set(trace.needed(i)) == routed
        h = layer(h)
    assert trace.ahead_SAE is not None and trace.ahead_SAE[2].abs().sum() == 0  # nothing after the last layer


def test_forecast_of_mixed_routers_matches_route_and_votes() -> None:
    """Routers of different kinds take the per-router path; those route() cannot evaluate are skipped."""
    from moe import MoE
    from moe.offload.predict import forecast, route, votes

    torch.manual_seed(0)
    kinds = ["topk", "aux_free", "recurrent", "topk"]
    routers = [MoE(16, 8, 8, 2, router=kind).router for kind in kinds]
    x = torch.randn(5, 16)
    probs, picked, ahead = forecast(routers, 0, x, lookahead=3)
    torch.testing.assert_close(probs, route(routers[0], x)[0].mean(0))
    assert picked is not None and picked.sum() == 5 * 2
    assert [t for t, _ in ahead] == [1, 3]  # the recurrent router (layer 2) cannot be evaluated alone
    for target, v in ahead:
        torch.testing.assert_close(v, votes(*route(routers[target], x)))
    assert forecast(routers, 2, x, lookahead=0) == (None, None, [])


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_route_uses_the_routers_group_score(group_score: str) -> None:
    from moe.config import AuxFreeConfig
    from moe.offload.predict import route
    from moe.routing import AuxFreeRouter

    torch.manual_seed(0)
    router = AuxFreeRouter(16, 16, 4, AuxFreeConfig(n_group=4, topk_group=2, group_score=group_score)).eval()
    with torch.no_grad():
        router.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(64, 16)
    predicted = route(router, x)
    assert predicted is not None
    actual = router(x).expert_ids
    assert torch.equal(predicted[1].sort(-1).values, actual.sort(-1).values)


def _engine_with_fetch_log(per_layer: int, layers: int) -> tuple[CacheEngine, Residency, list]:
    from moe.offload.policies import Predictive

    res = Residency(per_layer * layers, Predictive(), layers)
    fetched: list = []
    return CacheEngine(res, lambda layer: 1, fetch=lambda key, prefetch: fetched.append((key, prefetch))), res, fetched


def test_a_prefetch_never_evicts_a_more_confident_one_of_the_same_step() -> None:
    engine, res, fetched = _engine_with_fetch_log(2, 2)
    for needed in ([0], []):  # layer 1 holds expert 0, now of low value
        for _ in engine.step(1, needed, torch.tensor([0.97, 0.01, 0.01, 0.01])):
            pass
    fetched.clear()
    votes = torch.tensor([0.0, 0.5, 0.3, 0.2])  # layer 0 predicts layer 1 needs e1 > e2 > e3
    for _ in engine.step(0, [0], torch.tensor([1.0, 0, 0, 0]), lookahead=[(1, votes)]):
        pass
    assert [key for key, prefetch in fetched if prefetch] == [(1, 1)]
    assert (1, 1) in res and res.stats.wasted_prefetches == 0


def test_only_forecasts_above_min_confidence_are_prefetched() -> None:
    engine, res, fetched = _engine_with_fetch_log(2, 2)
    engine.min_confidence = 0.3
    votes = torch.tensor([0.0, 0.5, 0.25, 0.0])  # e1 passes the floor, e2 does not
    for _ in engine.step(0, [0], torch.tensor([1.0, 0, 0, 0]), lookahead=[(1, votes)]):
        pass
    assert [key for key, prefetch in fetched if prefetch] == [(1, 1)]
    with pytest.raises(ValueError, match="min_confidence must be a router probability"):
        CacheEngine(res, lambda layer: 1, min_confidence=-0.1)
    with pytest.raises(ValueError, match="min_confidence must be a router probability"):
        mo.OffloadConfig(expert_cache_bytes=1, min_confidence=2.0)


def test_a_resident_guess_does_not_use_up_the_prefetch_budget() -> None:
    """The link can take one copy: it goes to the guess that is missing, not the resident one."""
    from moe.offload.policies import Predictive

    res = Residency(4, Predictive(), 2)
    fetched: list = []
    engine = CacheEngine(res, lambda layer: 1, fetch=lambda k, p: fetched.append((k, p)), prefetch_budget=lambda: 1)
    for _ in engine.step(1, [0], torch.tensor([0.9, 0.1, 0, 0])):  # layer 1 holds expert 0
        pass
    fetched.clear()
    votes = torch.tensor([0.6, 0.4, 0.0, 0.0])  # e0 (resident) is the top guess, then e1
    for _ in engine.step(0, [0], torch.tensor([1.0, 0, 0, 0]), lookahead=[(1, votes)]):
        pass
    assert [key for key, prefetch in fetched if prefetch] == [(1, 1)]


def test_prefetching_recovers_after_a_run_of_bad_predictions() -> None:
    """Misses raise a layer's confidence threshold; it must come down again when nothing passes
    it, or a threshold above every possible vote (votes are probabilities) ends prefetching."""
    engine, res, _ = _engine_with_fetch_log(2, 2)
    engine.threshold[1] = 1.5  # where a run of wasted prefetches can leave it
    right = torch.tensor([0.0, 0.9, 0.0, 0.0])
    cycle = ((0, [0], [(1, right)]), (1, [1], []), (0, [0], []), (1, [2], []), (0, [0], []), (1, [3], []))
    for _ in range(30):  # layer 1 cycles through experts 1, 2, 3 with room for 2: 1 keeps leaving
        for layer, needed, ahead in cycle:
            for _ in engine.step(layer, needed, torch.full((4,), 0.25), ahead):
                pass
    assert engine.threshold[1] < 0.9 and res.stats.prefetches > 0 and res.stats.prefetch_hits > 0


@pytest.mark.parametrize("kind", ["expert_choice", "recurrent", "aux_free"])
def test_recorder_records_every_router_kind(kind: str) -> None:
    from moe import MoE

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[MoE(16, 8, 8, 2, router=kind) for _ in range(3)])
    x = torch.randn(6, 16)
    with mo.TraceRecorder(layers, lookahead=1) as rec, torch.no_grad():
        layers(x)
    trace = rec.trace()
    assert trace.num_steps == 3 and all(trace.needed(s) for s in range(3))
    h = x
    with torch.no_grad():
        for i, layer in enumerate(layers):
            routed = layer.router(h).expert_ids
            assert set(trace.needed(i)) == set(routed[routed >= 0].tolist())
            h = layer(h)


def test_a_prefetch_that_cannot_fit_evicts_nothing() -> None:
    """Global pool, experts of different sizes: evicting the one low-value resident would not
    free enough for the prediction, so nothing is evicted (it was evicted, then the prefetch gave up)."""
    from moe.offload.policies import Predictive

    size = {0: 2, 1: 7, 2: 4}
    res = Residency(10, Predictive(), 3, "global")
    engine = CacheEngine(res, size.__getitem__)
    for layer, e, p in ((0, 0, 0.1), (1, 0, 0.9), (0, None, 0.1)):
        for _ in engine.step(layer, [] if e is None else [e], torch.tensor([p, 1 - p])):
            pass
    assert sorted(res.size) == [(0, 0), (1, 0)]
    for _ in engine.step(1, [0], torch.tensor([0.9, 0.1]), lookahead=[(2, torch.tensor([0.5, 0.0]))]):
        pass
    assert sorted(res.size) == [(0, 0), (1, 0)] and res.stats.prefetches == 0


def test_trace_select_takes_every_per_step_tensor_alike() -> None:
    trace = mo.synthetic_trace(mo.SyntheticConfig(num_layers=2, num_experts=8, top_k=2, tokens=5, lookahead=1))
    steps = torch.tensor([4, 1, 2])
    part = trace.select(steps)
    assert part.num_steps == 3 and part.layer_S.tolist() == trace.layer_S[steps].tolist()
    assert [part.needed(i) for i in range(3)] == [trace.needed(4), trace.needed(1), trace.needed(2)]
    assert part.probs_SE is not None and torch.equal(part.probs_SE, trace.probs_SE[steps])  # type: ignore[index]
    assert part.ahead_SAE is not None and torch.equal(part.ahead_SAE, trace.ahead_SAE[steps])  # type: ignore[index]
    assert (part.num_layers, part.num_experts, part.expert_bytes, part.source) == (
        trace.num_layers, trace.num_experts, trace.expert_bytes, trace.source,
    )  # fmt: skip
