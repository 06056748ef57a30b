"""Expert parallelism on 2 and 4 gloo ranks (CPU): every mode and pipeline degree vs one process.

Each spawned rank builds the single-process layer itself (fp64, tiny shapes) and checks its
own slice of the outputs and gradients, so a failure raises inside the rank and mp.spawn
re-raises it here.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe
from moe.parallel import ExpertParallelDispatcher, Plan, PlannerConfig, load_checkpoint, save_checkpoint
from moe.parallel.alltoall import all_to_all, exchange_counts, start_all_to_all, wait_all_to_all
from moe.parallel.layout import valid_modes

pytestmark = pytest.mark.distributed

D, H, K = 6, 4, 2
TOL = dict(rtol=1e-10, atol=1e-10)
TOKENS = [5, 0, 7, 3]  # rank 1 has no tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world, *args)
        # No rank tears the group down while another still has exchanges in flight: gloo aborted
        # a rank now and then ("terminate called without an active exception") without this.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 60) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(world, _free_port(), fn, args, timeout_s), nprocs=world, join=True)


def _layers(world: int, num_experts: int, **kw: Any) -> tuple[moe.MoE, moe.MoE]:
    """(single-process layer, expert-parallel layer with the same weights), fp64."""
    torch.manual_seed(0)
    opts = dict(num_shared_experts=1, shared_expert_gate=True)
    single = moe.MoE(D, H, num_experts, K, **opts).double()  # type: ignore[arg-type]
    with torch.no_grad():
        # Dyadic router weights and inputs make the fp32 logits exact whatever the batch split,
        # so the routing is bitwise identical and fp64 outputs can be compared at 1e-10.
        single.router.weight.copy_(torch.round(single.router.weight * 16) / 4)
        single.router.weight[-1] = -5.0  # inputs are positive: the last expert never gets a token
    layer = moe.MoE(D, H, num_experts, K, **opts, process_group=dist.group.WORLD, **kw).double()  # type: ignore[arg-type]
    state = {k: v for k, v in single.state_dict().items() if not k.startswith("experts.")}
    layer.load_state_dict(state, strict=False)
    layer.experts.load_global(single.experts.w_in.detach(), single.experts.w_out.detach())
    return single, layer


def _batch(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(1, 9, (t, D), generator=g).double() / 8 for t in TOKENS[:world]]
    gs = [torch.randn(t, D, generator=g, dtype=torch.float64) for t in TOKENS[:world]]
    return xs, gs


def _local_expert_grad(layer: moe.MoE, full_w_in: torch.Tensor, full_w_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    probe = moe.parallel.ParallelExperts(
        layer.config.num_experts, D, H, layer.config.activation, "auto", dist.group.WORLD
    ).double()
    probe.load_global(full_w_in, full_w_out)
    return probe.w_in.detach(), probe.w_out.detach()


def _check_against_single(layer: moe.MoE, single: moe.MoE, rank: int, world: int, plans: list[Plan | None]) -> None:
    single.zero_grad(set_to_none=True)
    xs, gs = _batch(world)
    x_all = torch.cat(xs).requires_grad_()
    y_ref = single(x_all)
    (y_ref * torch.cat(gs)).sum().backward()
    if single.config.num_experts > K:
        assert int(single.stats.tokens_per_expert[-1]) == 0  # an expert with no tokens anywhere
    start = sum(TOKENS[:rank])
    sl = slice(start, start + TOKENS[rank])
    ref_w_in, ref_w_out = _local_expert_grad(layer, single.experts.w_in.grad, single.experts.w_out.grad)
    for plan in plans:
        if plan is not None:
            layer.parallel.pin(plan)
        layer.zero_grad(set_to_none=True)
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        (y * gs[rank]).sum().backward()
        torch.testing.assert_close(y, y_ref[sl].detach(), **TOL, msg=f"{plan}: output")
        torch.testing.assert_close(x.grad, x_all.grad[sl], **TOL, msg=f"{plan}: input grad")
        torch.testing.assert_close(layer.experts.w_in.grad, ref_w_in, **TOL, msg=f"{plan}: w_in grad")
        torch.testing.assert_close(layer.experts.w_out.grad, ref_w_out, **TOL, msg=f"{plan}: w_out grad")
        for (name, p), q in zip(layer.named_parameters(), single.parameters(), strict=True):
            if name.startswith("experts."):
                continue
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)  # replicated params: the global batch's grad is the sum over ranks
            # The router computes in fp32 by design, so its weight's grad is fp32-accurate only.
            tol = dict(rtol=1e-6, atol=1e-8) if name.startswith("router.") else TOL
            torch.testing.assert_close(grad, q.grad, **tol, msg=f"{plan}: {name} grad")


def _modes_rank(rank: int, world: int, num_experts: int, degrees: tuple[int, ...]) -> None:
    single, layer = _layers(world, num_experts, parallel_plan="ep" if num_experts >= world else "dp")
    modes = valid_modes(num_experts, H, world)
    assert layer.parallel.modes == modes
    plans: list[Plan | None] = [Plan(m, d) for m in modes for d in degrees]
    _check_against_single(layer, single, rank, world, plans + plans[:1])  # switch back: no parameter moved


def _save(rank: int, world: int, path: str, out_path: str) -> None:
    _, layer = _layers(world, 4, parallel_plan="ep")
    with torch.no_grad():
        layer.experts.w_in.mul_(1.5 + rank)  # distinct from the seed's weights
    save_checkpoint(layer, path)
    torch.save(layer(_batch(world)[0][rank]), f"{out_path}.{rank}")


def _check_mismatch(rank: int) -> None:
    for kwargs, field in [(dict(num_experts=4 + 4 * rank), "num_experts"), (dict(dim=D + 2 * rank), "dim")]:
        args = dict(dim=D, hidden_dim=H, num_experts=4, top_k=K) | kwargs
        with pytest.raises(ValueError, match=f"{field}: rank 0=.*rank 1="):
            moe.MoE(**args, process_group=dist.group.WORLD)  # type: ignore[arg-type]


def _check_plan_mismatch(rank: int) -> None:
    # Ranks pinned to different plans would issue different collectives (a gloo abort, an NCCL hang).
    with pytest.raises(ValueError, match="pinned_mode: rank 0=.*rank 1="):
        moe.MoE(D, H, 4, K, process_group=dist.group.WORLD, parallel_plan="dp" if rank == 0 else "ep")


def _check_wrong_shape_checkpoint(rank: int, world: int, path: str) -> None:
    # The EP-2 file (hidden H) into a layer with hidden H // 2: a clear error, not sliced weights.
    small = moe.MoE(D, H // 2, 4, K, num_shared_experts=1, shared_expert_gate=True, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="expert weights are"):
        load_checkpoint(small.double(), path)


def _check_activation_checkpointing(rank: int, world: int) -> None:
    # Non-reentrant checkpointing recomputes the layer inside backward: it must reuse the
    # forward's plan while the adaptive planner explores, and give the plain layer's gradients.
    from torch.utils.checkpoint import checkpoint

    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1, check_every=1)
    single, layer = _layers(world, 4, planner_config=cfg)
    x = _batch(world)[0][rank]
    for _ in range(len(layer.parallel.planner.candidates) + 2):
        layer.zero_grad(set_to_none=True)
        checkpoint(layer, x, use_reentrant=False).sum().backward()
        ckpt_grad = layer.experts.w_in.grad.clone()
        layer.parallel.pin(layer.parallel.last_plan)
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        layer.parallel.pin(None)
        torch.testing.assert_close(ckpt_grad, layer.experts.w_in.grad, **TOL)


def _check_timeout(rank: int) -> None:
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.ones(1), group=group)  # rank 1 never joins
        assert time.monotonic() - start < 30
    dist.barrier()


def _check_exchange_counts(rank: int, world: int) -> None:
    """Row w of the counts goes to rank w, also from a transposed (non-contiguous) view."""
    sent_CW = torch.arange(3 * world, dtype=torch.int64).view(3, world) + 100 * rank  # [3, W]
    got = exchange_counts(sent_CW.t())  # row w = column w of every rank's [3, W]
    want = torch.stack([torch.arange(3) * world + rank + 100 * src for src in range(world)])
    assert got.is_contiguous() and torch.equal(got, want), (got, want)


def _check_exchanges(rank: int, world: int) -> None:
    """all_to_all and start/wait give the same rows with and without autograd, and their
    backward is the reverse exchange (uneven splits: rank r sends r + 1 + d rows to rank d)."""
    in_splits = [rank + 1 + d for d in range(world)]
    out_splits = [src + 1 + rank for src in range(world)]
    x = (torch.arange(sum(in_splits) * 3, dtype=torch.float64).view(-1, 3) + 1000 * rank).requires_grad_()
    want = torch.cat(
        [
            torch.arange(sum(src + 1 + d for d in range(world)) * 3, dtype=torch.float64).view(-1, 3)[
                sum(src + 1 + d for d in range(rank)) : sum(src + 1 + d for d in range(rank + 1))
            ]
            + 1000 * src
            for src in range(world)
        ]
    )
    for exchange in (all_to_all, lambda *a: wait_all_to_all(*start_all_to_all(*a))):
        with torch.no_grad():
            plain = exchange(x, in_splits, out_splits)
        assert plain.grad_fn is None and torch.equal(plain, want)
        y = exchange(x, in_splits, out_splits)
        assert y.grad_fn is not None and torch.equal(y, want)
        x.grad = None
        (y * (rank + 1)).sum().backward()  # each received row's gradient is its receiver's rank + 1
        grad_want = torch.cat([torch.full((n, 3), d + 1.0, dtype=torch.float64) for d, n in enumerate(in_splits)])
        assert torch.equal(x.grad, grad_want), (x.grad, grad_want)


def _two_ranks(rank: int, world: int, path: str, out_path: str) -> None:
    _check_exchange_counts(rank, world)
    _check_exchanges(rank, world)
    _modes_rank(rank, world, 4, (1, 3))
    _check_mismatch(rank)
    _check_plan_mismatch(rank)
    _save(rank, world, path, out_path)
    _check_wrong_shape_checkpoint(rank, world, path)
    _check_activation_checkpointing(rank, world)
    _check_timeout(rank)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory: Any) -> tuple[str, torch.Tensor]:
    """Runs every 2-rank check once; returns (EP-2 checkpoint path, EP-2 outputs on the batch)."""
    tmp = tmp_path_factory.mktemp("ep2")
    path, out = str(tmp / "ckpt.safetensors"), str(tmp / "y")
    _spawn(_two_ranks, 2, path, out)
    return path, torch.cat([torch.load(f"{out}.{r}") for r in range(2)])


def test_two_ranks_modes_mismatch_timeout_checkpoint(ep2_run: tuple[str, torch.Tensor]) -> None:
    """2 ranks: every mode x degree vs one process (run in the fixture), mismatched configs
    raise on every rank, a timed-out collective raises; the EP-2 checkpoint loads at EP 1."""
    path, y2 = ep2_run
    single = moe.MoE(D, H, 4, K, num_shared_experts=1, shared_expert_gate=True).double()
    load_checkpoint(single, path)
    torch.testing.assert_close(single(torch.cat(_batch(2)[0])).detach(), y2, **TOL)


def _four_ranks(rank: int, world: int, path: str, out_path: str) -> None:
    _modes_rank(rank, world, 4, (1, 3))
    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1, check_every=2)
    single, layer = _layers(world, 4, planner_config=cfg)
    n_candidates = len(layer.parallel.planner.candidates)
    # Exploration (1 sample each), a possible run-off of the two best (2 x 2 samples), then the pick.
    _check_against_single(layer, single, rank, world, [None] * (n_candidates + 4 + 3))
    report = layer.parallel.report()
    assert not report["exploring"] and report["plan"] in report["candidates"], report
    assert "fastest predicted" in report["reason"], report
    assert all(row["samples"] >= 1 for row in report["candidates"].values()), report
    # Hierarchical 2D exchange (2 "nodes" of 2 ranks) gives the same results.
    layer.parallel.dispatcher = ExpertParallelDispatcher(4, dist.group.WORLD, local_size=2)
    _check_against_single(layer, single, rank, world, [Plan(1, 1), Plan(2, 2)])
    # The EP-2 checkpoint at EP 4 (the 2-rank batch, split 4 ways).
    torch.manual_seed(123)
    loaded = moe.MoE(D, H, 4, K, num_shared_experts=1, shared_expert_gate=True, process_group=dist.group.WORLD)
    loaded = loaded.double()
    load_checkpoint(loaded, path)
    x = torch.cat(_batch(2)[0])
    share = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    torch.save((share, loaded(x[share])), f"{out_path}.{rank}")
    # Two expert-parallel groups (like two pipeline stages) each save their own file: the
    # writer is rank 0 of the group, not of the world.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = rank // 2
    stage = moe.MoE(D, H, 4, K, process_group=groups[mine], parallel_plan="ep")
    save_checkpoint(stage, f"{out_path}.stage{mine}.safetensors")
    dist.barrier()
    assert all(os.path.exists(f"{out_path}.stage{g}.safetensors") for g in range(2))


def test_four_ranks_modes_planner_hierarchical_checkpoint(ep2_run: tuple[str, torch.Tensor], tmp_path: Any) -> None:
    """4 ranks: every mode x degree, the adaptive planner and the hierarchical exchange vs one
    process; the EP-2 checkpoint loaded at EP 4 gives EP 2's outputs."""
    path, y2 = ep2_run
    out = str(tmp_path / "y")
    _spawn(_four_ranks, 4, path, out)
    y4 = torch.empty_like(y2)
    for r in range(4):
        share, y = torch.load(f"{out}.{r}")
        y4[share] = y
    torch.testing.assert_close(y4, y2, **TOL)


def test_four_ranks_two_experts_sharded_storage() -> None:
    """W > E: each rank stores half of one expert's hidden units; every mode still matches."""
    _spawn(_modes_rank, 4, 2, (1, 2))


def test_collective_device_is_the_cpu_under_gloo_and_the_config_check_passes() -> None:
    """Bookkeeping collectives stay on the CPU under gloo (NCCL would put them on the GPU)."""
    from moe.parallel.alltoall import check_same_config, collective_device

    own = not dist.is_initialized()  # earlier in-process tests may have left a group behind
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert collective_device() == torch.device("cpu")
        check_same_config({"num_experts": 4, "dim": 8})  # one rank: always the same config
    finally:
        if own:
            dist.destroy_process_group()


def test_planner_measures_forward_and_backward() -> None:
    """A measured training step is recorded when its backward has finished (chunked plans pay
    there); a forward whose backward never comes is recorded forward-only at the next call."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1)
        layer = moe.MoE(D, H, 4, K, process_group=dist.group.WORLD, planner_config=cfg)
        planner = layer.parallel.planner
        samples = lambda: sum(len(m.samples) for m in planner.models.values())  # noqa: E731
        x = torch.randn(5, D, requires_grad=True)
        y = layer(x)
        assert samples() == 0  # not yet: the backward is part of the measurement
        y.sum().backward()
        assert samples() == 1
        layer(torch.randn(5, D, requires_grad=True))  # no backward for this one ...
        layer(torch.randn(5, D))  # ... so it is recorded (forward only) here; this one at once
        assert samples() == 3
    finally:
        if own:
            dist.destroy_process_group()
