"""The adaptive planner vs every fixed (mode, pipeline degree) on balanced and skewed routing.

    torchrun --nproc_per_node=4 benchmarks/adaptive.py [--tokens 512] [--steps 20]

Per workload, one MoE layer per fixed plan plus one adaptive layer (same weights) train
forward+backward steps on the same batches, interleaved step by step (order rotated each step). Reported per plan:
median step time (slowest rank) over the measured steps; for the planner: its steady-state
median after exploration, the plan it picked, and the step time including exploration.
Also reports how much of the all-to-all time pipelining hides:
(t(ep, d=1) - t(ep, d=best)) / t(4 raw all-to-alls of the same bytes: a step exchanges them 4 times).
Writes bench_out/adaptive_w{W}.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import moe
from moe.parallel import Plan, PlannerConfig

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402


def _step(layer: moe.MoE, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()  # as for every layer but the first: dispatch's backward runs too
    dist.barrier()
    start = time.perf_counter()
    layer(x).square().mean().backward()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _make(args: argparse.Namespace, plan: Plan | None, skew: bool) -> moe.MoE:
    torch.manual_seed(0)
    cfg = PlannerConfig(chunk_options=(1, 2, 4), warmup=1, samples=3, check_every=5)
    layer = moe.MoE(
        args.dim,
        args.hidden,
        args.experts,
        args.top_k,
        process_group=dist.group.WORLD,
        parallel_plan=plan,
        planner_config=cfg,
    )
    layer.experts.reset_parameters()
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.weight.normal_()
        if skew:  # inputs share a direction that experts 0 and 1 (rank 0's) strongly prefer
            layer.router.weight[:2] += 0.01 * args.dim / 256 * 1.0
    return layer


def _batches(args: argparse.Namespace, skew: bool, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    shift = 1.0 if skew else 0.0
    return [torch.randn(args.tokens, args.dim, generator=g) * 0.5 + shift for _ in range(count)]


def _raw_a2a_time(nbytes_per_rank: int, iters: int = 7) -> float:
    world = dist.get_world_size()
    rows = max(world, nbytes_per_rank // 4 // world * world)
    x = torch.randn(rows)
    out = torch.empty_like(x)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(out, x)
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="measured steps per fixed plan")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for workload in ("balanced", "skewed"):
        skew = workload == "skewed"
        adaptive = _make(args, None, skew)
        fixed = {str(p): _make(args, p, skew) for p in adaptive.parallel.planner.candidates}
        explore = len(adaptive.parallel.planner.queue_plans())
        batches = _batches(args, skew, explore + args.steps)
        times: dict[str, list[float]] = {name: [] for name in fixed}
        planner_times: list[float] = []
        order = ["planner", *fixed]
        for i, x in enumerate(batches):
            if i < explore:  # exploration: the planner alone
                planner_times.append(_step(adaptive, x))
                continue
            shift = i % len(order)  # steady state: every layer, in an order rotated each batch
            for name in order[shift:] + order[:shift]:
                if name == "planner":
                    planner_times.append(_step(adaptive, x))
                else:
                    times[name].append(_step(fixed[name], x))
        steady = statistics.median(planner_times[explore:])
        medians = {name: statistics.median(ts[1:]) for name, ts in times.items()}
        best = min(medians, key=medians.__getitem__)
        worst = max(medians, key=medians.__getitem__)
        report = adaptive.parallel.report()
        copies = args.tokens * args.top_k
        # A step exchanges the copies 4 times: dispatch and combine, forward and backward.
        a2a = 4 * _raw_a2a_time(copies * args.dim * 4)
        d1 = medians.get("ep/d=1")
        pipes = {n: t for n, t in medians.items() if n.startswith("ep/") and n != "ep/d=1"}
        hidden = None
        if d1 is not None and pipes:
            hidden = (d1 - min(pipes.values())) / a2a
        load = adaptive.stats.tokens_per_expert.float()
        for name, t in medians.items():
            rows.append({"workload": workload, "plan": name, "median_ms": 1e3 * t, "vs_best": t / medians[best]})
        rows.append(
            {
                "workload": workload,
                "plan": f"planner ({report['plan']})",
                "median_ms": 1e3 * steady,
                "vs_best": steady / medians[best],
            }
        )
        if rank == 0:
            print(
                f"\n## {workload}: W={world}, T={args.tokens}/rank, D={args.dim}, H={args.hidden}, E={args.experts}, "
            )
            print(f"   K={args.top_k}, fp32, fwd+bwd step, slowest rank, median of {args.steps - 1} steps")
            print(f"   rank-0 load per expert: {load.tolist()}  (MaxVio {report['max_violation']:.2f})")
            print(f"{'plan':>28} {'median ms':>10} {'vs best':>8}")
            for r in rows:
                if r["workload"] == workload:
                    print(f"{r['plan']:>28} {r['median_ms']:>10.2f} {r['vs_best']:>8.3f}")
            print(f"   best fixed {best}, worst fixed {worst} ({medians[worst] / medians[best]:.2f}x best)")
            chosen = medians.get(report["plan"])
            if chosen is not None:
                print(f"   the planner's pick as a fixed plan: {chosen / medians[best]:.3f}x best fixed")
            print(f"   planner: {report['reason']}")
            total = statistics.mean(planner_times)
            print(f"   planner mean incl. {explore} exploration steps: {1e3 * total:.2f} ms")
            if hidden is not None:
                print(f"   a2a time (4 raw exchanges of {copies * args.dim * 4} B/rank): {1e3 * a2a:.2f} ms; ")
                print(f"   pipelining hides {100 * hidden:.0f}% of it ((t(ep,d=1) - t(ep,best d)) / a2a)")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"adaptive_w{world}.csv")
        harness.write_csv(path, rows)
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
