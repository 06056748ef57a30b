"""Planner decisions and the parameter layout, in one process (no ranks needed)."""

from __future__ import annotations

import pytest
import torch

from moe.parallel import Plan, Planner, PlannerConfig
from moe.parallel.layout import UnitExchange, from_units, needed_units, stored_units, to_units, valid_modes

COST_MS = {Plan(0, 1): 9.0, Plan(0, 2): 8.0, Plan(1, 1): 5.0, Plan(1, 2): 3.0}


def _run(planner: Planner, steps: int, copies: int = 100, cost: dict[Plan, float] = COST_MS) -> list[Plan]:
    ran = []
    for _ in range(steps):
        plan, measure = planner.choose()
        ran.append(plan)
        if measure:
            planner.record(plan, cost[plan] * 1e-3, copies, torch.tensor([copies, copies]))
    return ran


def test_planner_explores_every_candidate_then_picks_the_fastest() -> None:
    planner = Planner([0, 1], config=PlannerConfig(chunk_options=(1, 2), warmup=1, samples=2, check_every=3))
    ran = _run(planner, 12 + 5)
    assert set(ran[:12]) == set(COST_MS)  # 4 candidates x (1 warm-up + 2 samples), interleaved
    assert ran[12:] == [Plan(1, 2)] * 5
    report = planner.report()
    assert report["plan"] == "ep/d=2" and not report["exploring"]
    assert "fastest predicted" in report["reason"] and "next ep/d=1" in report["reason"]
    assert report["candidates"]["ep/d=2"]["median_ms"] == pytest.approx(3.0)
    assert report["candidates"]["dp/d=1"]["samples"] == 2


def test_planner_fits_alpha_beta_and_predicts_at_the_current_size() -> None:
    planner = Planner([0, 1], config=PlannerConfig(chunk_options=(1,), warmup=0, samples=2))
    # dp: t = 1 ms + 0.01 ms/copy; ep: t = 3 ms + 0.001 ms/copy -> dp wins at 100 copies, ep at 1000.
    for copies in (100, 1000):
        plan, _ = planner.choose()
        cost = {Plan(0, 1): 1.0 + 0.01 * copies, Plan(1, 1): 3.0 + 0.001 * copies}
        planner.record(plan, cost[plan] * 1e-3, copies, torch.ones(2))
        plan, _ = planner.choose()
        planner.record(plan, cost[plan] * 1e-3, copies, torch.ones(2))
    row = planner.report()["candidates"]["dp/d=1"]
    assert row["alpha_ms"] == pytest.approx(1.0) and row["beta_us_per_copy"] == pytest.approx(10.0)
    assert planner.current == Plan(1, 1)  # picked at 1000 copies


def test_planner_re_explores_on_a_token_distribution_shift_and_periodically() -> None:
    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1, check_every=1, recheck_every=50)
    planner = Planner([0, 1], config=cfg)
    _run(planner, 4 + 3)
    assert planner.current == Plan(1, 2) and not planner.queue_plans()
    _run(planner, 1, copies=400)  # 4x more tokens per rank: re-explore with fresh samples
    assert "shifted" in planner.reason and len(planner.queue_plans()) == 4
    flipped = {p: 10.0 - c for p, c in COST_MS.items()}  # now dp/d=1 is fastest
    _run(planner, 4, copies=400, cost=flipped)
    assert planner.current == Plan(0, 1)
    planner = Planner([0, 1], config=PlannerConfig(chunk_options=(1,), warmup=0, samples=1, recheck_every=2))
    _run(planner, 2 + 3)
    assert "periodic" in planner.reason and planner.queue_plans()


def test_pinned_plans_skip_measurement_and_partial_pins_restrict_candidates() -> None:
    planner = Planner([0, 1, 2], pinned_mode=2, pinned_chunks=4)
    assert planner.choose() == (Plan(2, 4), False) and planner.report()["pinned"]
    planner.pin(mode=1)
    assert {p.mode for p in planner.candidates} == {1}
    planner.pin(chunks=2)
    assert {p.chunks for p in planner.candidates} == {2} and len(planner.candidates) == 3
    with pytest.raises(ValueError, match="not valid for this layout"):
        planner.pin(mode=3)
    assert Plan.parse("ep+shard2/d=4") == Plan(2, 4) and Plan.parse("dp") == Plan(0, 1)
    with pytest.raises(ValueError, match="cannot parse plan"):
        Plan.parse("tp")


@pytest.mark.parametrize(("experts", "hidden", "world"), [(4, 6, 2), (4, 4, 4), (2, 4, 4), (8, 6, 1)])
def test_layout_units_cover_every_expert_once_and_roundtrip(experts: int, hidden: int, world: int) -> None:
    for swiglu in (True, False):
        width = 2 * hidden if swiglu else hidden
        w_in, w_out = torch.randn(experts, 5, width), torch.randn(experts, hidden, 5)
        back = from_units(to_units(w_in, w_out, swiglu), experts, swiglu)
        assert torch.equal(back[0], w_in) and torch.equal(back[1], w_out)
    stored = torch.cat([stored_units(experts, hidden, world, r).unit_ids(hidden) for r in range(world)])
    assert torch.equal(stored, torch.arange(experts * hidden))  # rank r holds a contiguous global range
    for mode in valid_modes(experts, hidden, world):
        used = torch.cat([needed_units(experts, hidden, world, r, mode).unit_ids(hidden) for r in range(world)])
        copies = experts * hidden * (world if mode == 0 else 1)
        assert used.numel() == copies and set(used.tolist()) == set(range(experts * hidden))
        plans = [UnitExchange(experts, hidden, world, r, mode) for r in range(world)]
        for r, plan in enumerate(plans):  # what r receives from s = what s sends to r
            assert plan.out_splits == [p.in_splits[r] for p in plans]
        local = mode == 1 or world == 1 or (experts < world and mode == world // experts)
        assert plans[0].local == local


def test_nccl_ranks_that_never_chose_their_gpu_get_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from moe.parallel import alltoall

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.warns(UserWarning, match=r"torch.cuda.set_device"):
        alltoall.warn_if_device_unset()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    alltoall.warn_if_device_unset()  # set: silent
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    alltoall.warn_if_device_unset()  # one visible GPU per process: silent


def test_single_process_checkpoint_is_written_whole_and_leaves_no_temp_file(tmp_path) -> None:  # noqa: ANN001
    import moe
    from moe.parallel import load_checkpoint, save_checkpoint

    layer = moe.MoE(6, 4, 4, 2)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(layer, path)
    save_checkpoint(layer, path)  # again onto the same path (every rank of a non-EP model may do this)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    twin = moe.MoE(6, 4, 4, 2)
    load_checkpoint(twin, path)
    for a, b in zip(layer.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_planner_runs_off_two_close_candidates() -> None:
    """Within runoff_margin of each other after exploration: both are sampled again before the pick."""
    close = {Plan(0, 1): 9.0, Plan(0, 2): 8.0, Plan(1, 1): 3.1, Plan(1, 2): 3.0}
    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=2)
    planner = Planner([0, 1], config=cfg)
    _run(planner, 8, cost=close)  # exploration: 4 candidates x 2 samples
    assert "run-off between ep/d=2 and ep/d=1" in planner.reason
    assert planner.queue_plans() == [Plan(1, 2), Plan(1, 1)] * 4
    ran = _run(planner, 8 + 3, cost=close)
    assert ran[:8] == [Plan(1, 2), Plan(1, 1)] * 4 and ran[8:] == [Plan(1, 2)] * 3
    assert "fastest predicted" in planner.reason
    assert planner.report()["candidates"]["ep/d=1"]["samples"] == 2 + 4
    apart = Planner([0, 1], config=cfg)
    _run(apart, 8)  # COST_MS: 3.0 vs 5.0, no run-off
    assert "fastest predicted" in apart.reason and not apart.queue_plans()
    with pytest.raises(ValueError, match="runoff_margin"):
        PlannerConfig(runoff_margin=-0.1)
