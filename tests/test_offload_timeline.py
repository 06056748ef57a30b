"""The decode timeline (moe.offload.timeline) on hand-sized traces whose times can be worked out."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe.offload import SyntheticConfig, TraceBuilder, synthetic_trace
from moe.offload.timeline import (
    PRESETS,
    TIMELINE_POLICIES,
    Hardware,
    compare,
    measured_hardware,
    preset,
    simulate_timeline,
)

# Times in seconds: layer work on the host only, copies of 10 s each, experts free.
SLOW_LINK = Hardware(
    name="test",
    expert_bytes=100,
    h2d_bytes_per_s=10.0,
    copy_latency_s=0.0,
    layer_host_s=1.0,
    layer_device_s=0.0,
    expert_host_s=0.0,
    expert_device_s=0.0,
)


def _trace(steps: list[tuple[int, list[int]]], num_layers: int, num_experts: int, ahead=None):
    b = TraceBuilder(num_layers, num_experts, lookahead=1 if ahead else 0)
    for i, (layer, needed) in enumerate(steps):
        preds = ahead[i] if ahead else []
        b.add(layer, needed, torch.full((num_experts,), 1.0 / num_experts), preds)
    return b.build(expert_bytes=100)


def test_a_demand_miss_costs_its_copy_and_a_hit_costs_nothing() -> None:
    # One layer, two experts, room for one: alternating requests miss every time under LRU.
    trace = _trace([(0, [0]), (0, [1]), (0, [0]), (0, [1])], num_layers=1, num_experts=2)
    lru = simulate_timeline(trace, "lru", 1, SLOW_LINK)
    assert lru.ms_per_token == pytest.approx(1e3 * 11.0)  # 1 s of layer + a 10 s copy, per token
    assert lru.bytes_per_token == 100 and lru.hit_rate == 0.0
    resident = simulate_timeline(trace, "resident", 1, SLOW_LINK)
    assert resident.ms_per_token == pytest.approx(1e3 * 1.0) and resident.bytes_per_token == 0
    stalls = {r.policy: r.stall_ms_per_token for r in compare(trace, 1, SLOW_LINK, ("lru", "resident"))}
    assert stalls == pytest.approx({"lru": 1e4, "resident": 0.0})


def test_copies_on_the_host_thread_add_up_without_overlap() -> None:
    trace = _trace([(0, [0]), (0, [1])], num_layers=1, num_experts=2)
    sync = dataclasses.replace(SLOW_LINK, async_copies=False, layer_host_s=0.0, expert_host_s=2.0)
    assert simulate_timeline(trace, "lru", 1, sync).ms_per_token == pytest.approx(1e3 * 12.0)


def test_a_prefetch_overlaps_the_host_work_before_its_use() -> None:
    # Two layers of two experts, room for two per layer. Token 1 brings in (0, 0) and (1, 0). In
    # token 2, layer 0 hits and its forecast names layer 1's expert 1: that copy (10 s) starts
    # while the host does layer 1's own work (1 s), so layer 1 waits 9 s instead of 10.
    none, votes = torch.zeros(2), torch.tensor([0.0, 1.0])
    steps = [(0, [0]), (1, [0]), (0, [0]), (1, [1])]
    trace = _trace(steps, num_layers=2, num_experts=2, ahead=[[(1, none)], [], [(1, votes)], []])
    lru = simulate_timeline(trace, "lru", 2, SLOW_LINK)
    pred = simulate_timeline(trace, "predictive", 2, SLOW_LINK, link_budget=False)
    # Token 1 (both): 1 s of layer 0, its copy to 11 (the host does layer 1 meanwhile), layer 1's
    # copy to 21. Token 2: layer 0 at 22 hits; LRU copies (1, 1) at 23 -> 33; predictive started
    # it at 22 -> 32.
    assert lru.ms_per_token == pytest.approx(1e3 * 33 / 2)
    assert pred.ms_per_token == pytest.approx(1e3 * 32 / 2)
    assert pred.prefetch_precision == 1.0 and pred.bytes_per_token == lru.bytes_per_token
    assert pred.ready_rate > lru.ready_rate
    # With the link budget a 10 s copy does not fit in the 1 s before layer 1's routing: no guess.
    budgeted = simulate_timeline(trace, "predictive", 2, SLOW_LINK)
    assert math.isnan(budgeted.prefetch_precision) and budgeted.ms_per_token == lru.ms_per_token
    fast = dataclasses.replace(SLOW_LINK, h2d_bytes_per_s=200.0)  # 0.5 s copies: one fits
    assert simulate_timeline(trace, "predictive", 2, fast).prefetch_precision == 1.0


def test_demand_copies_go_before_queued_prefetches_and_evicted_ones_are_cancelled() -> None:
    # Layer 0 needs experts 0 and 1 (two demand copies, 20 s); before them, at the step start, the
    # forecast queued a prefetch for layer 1. The demands overtake it; the prefetch then copies
    # behind them. A second run predicts the wrong expert, which is evicted before it copies.
    right = torch.tensor([0.0, 0.0, 1.0])
    trace = _trace([(0, [0, 1]), (1, [2])], num_layers=2, num_experts=3, ahead=[[(1, right)], []])
    pred = simulate_timeline(trace, "predictive", 2, SLOW_LINK, link_budget=False)
    # host: 1 (layer 0) -> demand 0 ready 11, demand 1 ready 21 -> host 21; layer 1: 22, its
    # prefetch starts at 21 and lands at 31.
    assert pred.ms_per_token == pytest.approx(1e3 * 31.0)
    assert pred.cancelled_prefetches == 0 and pred.bytes_per_token == 300
    # Wrong guess (expert 2 for layer 1, which then needs expert 1), room for one expert a layer:
    # the demand miss evicts the guess while it still waits behind layer 0's copies.
    wrong = torch.tensor([0.0, 0.0, 1.0])
    trace = _trace([(0, [0, 1]), (1, [1])], num_layers=2, num_experts=3, ahead=[[(1, wrong)], []])
    pred = simulate_timeline(trace, "predictive", 1, SLOW_LINK, link_budget=False)
    assert pred.cancelled_prefetches == 1 and pred.prefetch_precision == 0.0
    assert pred.bytes_per_token == 300  # the cancelled guess moved no bytes
    assert pred.ms_per_token == pytest.approx(1e3 * 31.0)


def test_ceilings_bound_the_online_policies_on_a_synthetic_trace() -> None:
    trace = synthetic_trace(SyntheticConfig(num_layers=4, num_experts=16, top_k=2, tokens=60, seed=1))
    hw = preset("4090-qwen3-30b-a3b-int4")
    rows = {r.policy: r for r in compare(trace, 4, hw)}
    assert set(rows) == set(TIMELINE_POLICIES)
    for name, r in rows.items():
        assert r.ms_per_token >= rows["resident"].ms_per_token - 1e-9, name
        assert r.hit_rate <= rows["belady"].hit_rate + 1e-9 or name in ("resident", "oracle"), name
        assert r.stall_ms_per_token >= -1e-9
    assert rows["oracle"].ms_per_token <= rows["lru"].ms_per_token
    assert 0.0 <= rows["predictive"].prefetch_precision <= 1.0


def test_cpu_misses_run_when_the_cpu_is_faster_than_the_copy() -> None:
    trace = synthetic_trace(SyntheticConfig(num_layers=4, num_experts=16, top_k=2, tokens=40, seed=2))
    hw = PRESETS["h100-mixtral"]
    assert hw.cpu_expert_s < hw.copy_s  # 352 MB: 1.8 ms from RAM on the CPU vs 6.8 ms over PCIe
    cpu = simulate_timeline(trace, "predictive_cpu", 4, hw)
    copy = simulate_timeline(trace, "predictive", 4, hw)
    assert cpu.ms_per_token < copy.ms_per_token and cpu.bytes_per_token < copy.bytes_per_token
    # CPU-computed experts are copied in while the link is idle, so later uses can hit.
    assert cpu.bytes_per_token > 0 and cpu.ready_rate > 0


def test_measured_preset_reproduces_the_resident_time_it_was_calibrated_on() -> None:
    trace = synthetic_trace(SyntheticConfig(num_layers=3, num_experts=8, top_k=2, tokens=20, seed=3))
    for share in (1.0, 0.5):
        hw = measured_hardware(
            trace,
            resident_s_per_token=0.02,
            h2d_bytes_per_s=1e9,
            copy_latency_s=1e-5,
            async_copies=True,
            host_share=share,
        )
        assert simulate_timeline(trace, "resident", 2, hw).ms_per_token == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: simulate_timeline(t, "mru", 2, SLOW_LINK), "unknown policy 'mru'"),
        (lambda t: simulate_timeline(t, "lru", 0, SLOW_LINK), "capacity must be >= 1"),
        (lambda t: simulate_timeline(t, "lru", 99, SLOW_LINK), "exceeds the trace's 8 experts"),
        (lambda t: preset("a100-mixtral"), "unknown preset 'a100-mixtral'"),
        (lambda t: dataclasses.replace(SLOW_LINK, copy_streams=0), "copy_streams must be >= 1"),
        (lambda t: dataclasses.replace(SLOW_LINK, layer_host_s=-1.0), "times must be >= 0"),
        (
            lambda t: measured_hardware(
                t, resident_s_per_token=0.0, h2d_bytes_per_s=1.0, copy_latency_s=0.0, async_copies=True
            ),
            "resident_s_per_token must be > 0",
        ),
        (lambda t: simulate_timeline(t, "lru", 2, SLOW_LINK, min_confidence=1.5), "min_confidence must be"),
        (lambda t: simulate_timeline(t, "lru", 2, SLOW_LINK, layer_capacities=[2]), "layer_capacities must give"),
        (lambda t: simulate_timeline(t, "lru", 2, SLOW_LINK, layer_capacities=[0, 4]), "layer_capacities must give"),
    ],
)
def test_bad_input_is_refused_clearly(call, match: str) -> None:
    trace = synthetic_trace(SyntheticConfig(num_layers=2, num_experts=8, top_k=2, tokens=4))
    with pytest.raises(ValueError, match=match):
        call(trace)


def test_presets_state_their_copy_to_compute_balance() -> None:
    mixtral, qwen4 = PRESETS["h100-mixtral"], PRESETS["4090-qwen3-30b-a3b-int4"]
    assert mixtral.copy_s > 20 * mixtral.expert_device_s  # copies dominate
    assert qwen4.copy_s < 5 * (qwen4.layer_host_s + qwen4.expert_host_s)  # comparable to per-layer work
    assert all(math.isfinite(p.copy_s) and p.notes for p in PRESETS.values())


def test_preset_expert_bytes_are_moe_quants_sizes() -> None:
    from moe.quant import quantize, quantized_expert_bytes

    # Qwen3-30B-A3B: hidden 2048, moe_intermediate 768, SwiGLU; Mixtral-8x7B: 4096, 14336.
    assert PRESETS["4090-qwen3-30b-a3b"].expert_bytes == quantized_expert_bytes(2048, 768, None) == 3 * 2048 * 768 * 2
    int4 = PRESETS["4090-qwen3-30b-a3b-int4"].expert_bytes
    assert int4 == quantized_expert_bytes(2048, 768, "int4", group_size=64)
    assert int4 * 8 == 3 * 2048 * 768 * 9 // 2  # 4.5 bits a weight
    assert PRESETS["h100-mixtral"].expert_bytes == quantized_expert_bytes(4096, 14336, None)
    # What quantize() stores for one Qwen3 expert (scaled down 16x in width: same bits a weight).
    w_in, w_out = torch.randn(1, 2048, 2 * 48), torch.randn(1, 48 * 16, 2048 // 16)
    stored = quantize(w_in, "int4", 64).nbytes + quantize(w_out, "int4", 64).nbytes
    assert stored * 8 == (w_in.numel() + w_out.numel()) * 9 // 2


def test_layer_capacities_size_each_layers_pool() -> None:
    """Layer 0 cycles over 3 experts, layer 1 reuses 1: 3 + 1 slots hit every reuse, 2 + 2 do not."""
    steps = [(0, [e]) for e in (0, 1, 2)] * 4
    trace = _trace([(layer, needed) for s in steps for layer, needed in (s, (1, [0]))], 2, 4)
    split = simulate_timeline(trace, "lru", 2, SLOW_LINK, layer_capacities=[3, 1])
    even = simulate_timeline(trace, "lru", 2, SLOW_LINK)
    assert split.hit_rate == pytest.approx((24 - 4) / 24)  # only the 4 first uses copy
    assert even.hit_rate == pytest.approx(11 / 24)  # layer 0 misses every time with 2 slots
    assert split.ms_per_token < even.ms_per_token
