"""All-to-all bandwidth in the style of nccl-tests: raw all_to_all_single vs our dispatch+combine.

    torchrun --nproc_per_node=4 benchmarks/all_to_all.py [--max-mib 64] [--iters 10] [--keep-freed-memory]

Per message size (bytes each rank sends in one exchange) and variant:
    raw          dist.all_to_all_single, equal splits (passed explicitly, as ours does)
    hier         moe.parallel.hierarchical_all_to_all, local_size = W / 2 (needs W >= 4)
    ep_a2a       our exchanges alone (count exchange + the two all_to_all_single of dispatch and
                 combine through the autograd wrapper, into fresh output buffers as in `ep`; raw
                 and floor reuse theirs): the communication part of `ep`
    ep           ExpertParallelDispatcher dispatch + combine (mode ep, d = 1, identity experts):
                 sort, permute, count exchange, two all-to-alls, unpermute
    ep_train     `ep` on an input that requires grad: the forward as a training step records it, with
                 one autograd node per exchange (`ep` runs under no_grad, where there are none)
    ep_planned   `ep` with its route (sort, count exchange, splits) planned before the timer: the same
                 gather, exchanges and weighted unpermute, so ep - ep_planned is what planning and
                 the count exchange cost, and ep_planned / floor bounds any dispatch that needs no
                 count exchange (one that sends at a capacity agreed in advance would add its own
                 padding and compaction on top)
    ep_min       the shortest dropless sequence, for E = W and top-1 only: sort, count exchange,
                 gather, two exchanges and unpermute as direct calls (no modes, chunks, checks or
                 autograd): what the dispatcher's generality costs, and a bound for a
                 Python-driven dispatch that exchanges counts
    ep_pipe4     the same pipelined in 4 chunks (ExpertParallelDispatcher.run, chunks=4)
    floor        what dispatch+combine cannot avoid: the two raw exchanges plus two plain copies of
                 the bytes (into buffers allocated outside the timing), for the send order and
                 the token order; `ep` / `floor` is our overhead, `floor` / raw what the data
                 path's local passes cost on this machine
Time = the slowest rank's, median over iterations after warm-up, with a barrier before each
iteration; variants are interleaved inside each iteration, in an order rotated every iteration.
algbw = bytes per rank / time (dispatch+combine moves the bytes twice, so its algbw counts 2x);
busbw = algbw * (W-1)/W.
Writes bench_out/all_to_all_w{W}.csv and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe import ops
from moe.cpu_memory import pooled_empty
from moe.parallel import ExpertParallelDispatcher, all_to_all, hierarchical_all_to_all
from moe.parallel.alltoall import exchange_counts
from moe.routing.base import Routing

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402


class _Identity:
    """Stands in for ParallelExperts: no weights, y = x (measures the data path only)."""

    def weights(self, mode: int) -> None:
        return None

    def __call__(self, x: torch.Tensor, counts: torch.Tensor, weights: Any) -> torch.Tensor:
        return x


def _balanced_routing(tokens: int, world: int) -> Routing:
    ids = (torch.arange(tokens) % world).unsqueeze(1)  # E = W experts, 1 per rank, top-1
    return Routing(ids, torch.ones(tokens, 1), max_copies=tokens)


def _variants(
    x: torch.Tensor, routing: Routing, dispatcher: ExpertParallelDispatcher, world: int
) -> dict[str, tuple[Callable[[], Any], int]]:
    """name -> (one iteration, how many times it moves the bytes)."""
    out = torch.empty_like(x)
    splits = torch.full((world, world), x.shape[0] // world, dtype=torch.int64)
    experts = _Identity()

    even = [x.shape[0] // world] * world

    def raw() -> None:  # explicit splits, as ours passes them (on gloo that call was 3-15% faster)
        dist.all_to_all_single(out, x, even, even)

    def ep(chunks: int) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                if chunks == 1:
                    xs, _, handle = dispatcher.dispatch(x, routing)
                    dispatcher.combine(xs, handle)
                else:
                    dispatcher.run(x, routing, experts, 1, chunks)  # type: ignore[arg-type]

        return go

    variants: dict[str, tuple[Callable[[], Any], int]] = {"raw": (raw, 1)}
    if world >= 4 and world % 2 == 0:
        variants["hier"] = (lambda: hierarchical_all_to_all(x, splits, world // 2), 1)

    def ep_a2a() -> None:  # our exchanges alone: count exchange + dispatch and combine all-to-alls
        with torch.no_grad():
            exchange_counts(torch.ones(world, 1, dtype=torch.int64))
            back = all_to_all(all_to_all(x, even, even), even, even)
            del back

    send, recv, back, tokens = (torch.empty_like(x) for _ in range(4))

    def floor() -> None:
        send.copy_(x)
        dist.all_to_all_single(recv, send, even, even)
        dist.all_to_all_single(back, recv, even, even)
        tokens.copy_(back)

    variants["floor"] = (floor, 2)
    variants["ep_a2a"] = (ep_a2a, 2)
    variants["ep"] = (ep(1), 2)
    x_train = x.detach().requires_grad_()

    def ep_train() -> None:
        xs, _, handle = dispatcher.dispatch(x_train, routing)
        dispatcher.combine(xs, handle)  # the graph is freed on return, as after a backward

    variants["ep_train"] = (ep_train, 2)
    (route,) = dispatcher.plan_routes(routing, 1, 1)  # E = W experts: no (source, expert) reorder

    def ep_planned() -> None:
        with torch.no_grad():
            received = all_to_all(ops.permute(x, route.send_token_idx), route.in_splits, route.out_splits)
            back = all_to_all(received, route.out_splits, route.in_splits)
            ops.unpermute(back, route.token_idx, route.weights, x.shape[0])

    variants["ep_planned"] = (ep_planned, 2)
    ids, gate = routing.expert_ids.reshape(-1), routing.weights.reshape(-1)

    def ep_min() -> None:
        order, counts = ops.sort_by_expert(ids, world)
        recv_counts = torch.empty_like(counts)
        work = dist.all_to_all_single(recv_counts, counts, async_op=True)
        in_splits = counts.tolist()
        sent = ops.permute(x, order)
        work.wait()
        out_splits = recv_counts.tolist()
        received = pooled_empty((sum(out_splits), x.shape[1]), x)
        dist.all_to_all_single(received, sent, out_splits, in_splits)
        back = pooled_empty((sum(in_splits), x.shape[1]), x)
        dist.all_to_all_single(back, received, in_splits, out_splits)
        ops.unpermute(back, order, gate[order], x.shape[0])

    variants["ep_min"] = (ep_min, 2)
    variants["ep_pipe4"] = (ep(4), 2)
    return variants


def _timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-kib", type=int, default=64)
    parser.add_argument("--max-mib", type=int, default=64)
    parser.add_argument("--row-floats", type=int, default=1024, help="D: fp32 values per token row")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="op backend of the local passes (auto: C++ ops if built)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="moe.keep_freed_memory(): no page faults on fresh buffers"
    )
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    if args.keep_freed_memory:
        import moe

        moe.keep_freed_memory()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dim = args.row_floats
    row_bytes = 4 * dim
    dispatcher = ExpertParallelDispatcher(world, None, args.backend)
    sizes, size = [], args.min_kib * 1024
    while size <= args.max_mib * 1024 * 1024:
        sizes.append(size)
        size *= 4
    rows = []
    for nbytes in sizes:
        tokens = max(world, nbytes // row_bytes // world * world)
        actual = tokens * row_bytes
        x = torch.randn(tokens, dim)
        variants = _variants(x, _balanced_routing(tokens, world), dispatcher, world)
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for it in range(args.warmup + args.iters):
            shift = it % len(names)  # rotate the order: no variant always runs first
            for name in names[shift:] + names[:shift]:
                fn = variants[name][0]
                t = torch.tensor([_timed(fn)], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if it >= args.warmup:
                    times[name].append(float(t))
        for name, (_, passes) in variants.items():
            t = statistics.median(times[name])
            algbw = passes * actual / t / 1e9
            rows.append(
                {
                    "world": world,
                    "bytes_per_rank": actual,
                    "variant": name,
                    "time_ms": 1e3 * t,
                    "algbw_GBps": algbw,
                    "busbw_GBps": algbw * (world - 1) / world,
                }
            )
    if rank == 0:
        _report(rows, world, args.out)
    dist.destroy_process_group()


def _report(rows: list[dict[str, Any]], world: int, out_dir: str) -> None:
    raw = {r["bytes_per_rank"]: r["busbw_GBps"] for r in rows if r["variant"] == "raw"}
    print(f"# all_to_all, gloo, {world} ranks, fp32; time = slowest rank, median after warm-up")
    print(f"{'bytes/rank':>12} {'variant':>10} {'time ms':>9} {'algbw GB/s':>11} {'busbw GB/s':>11} {'% of raw':>9}")
    for r in rows:
        pct = 100 * r["busbw_GBps"] / raw[r["bytes_per_rank"]]
        r["pct_of_raw"] = pct
        print(
            f"{r['bytes_per_rank']:>12} {r['variant']:>10} {r['time_ms']:>9.3f} {r['algbw_GBps']:>11.3f} "
            f"{r['busbw_GBps']:>11.3f} {pct:>8.1f}%"
        )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"all_to_all_w{world}.csv")
    harness.write_csv(path, rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {path} (matplotlib missing: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["bytes_per_rank"], r["busbw_GBps"]) for r in rows if r["variant"] == variant]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"all-to-all, gloo, {world} ranks")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, f"all_to_all_w{world}.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
