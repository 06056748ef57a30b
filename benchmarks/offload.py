"""Expert-cache hit rates: online policies beside Belady's MIN and an i.i.d. baseline.

    python benchmarks/offload.py                      # synthetic traces + one recorded from a random model
    python benchmarks/offload.py --trace run.safetensors --sizes 0.125 0.25 0.5
    python benchmarks/offload.py --quick              # small traces (CI smoke)

Two rates per policy (moe.offload.CacheStats):
    hit   = 1 - (copies + prefetches + CPU misses) / requests: the traffic view; Belady bounds it
            for every policy, prefetching or not, and (1 - hit) * bytes / bandwidth is the transfer time.
    ready = fraction of requests whose expert was on the device when asked for (no stall): the
            latency view, where correct prefetches count. Belady's MIN does NOT bound it (a
            prefetcher can beat it there), so pred/belady compares hit rates only.
iid = LRU on the same trace with each layer's steps shuffled (same popularity, no locality).
Writes bench_out/offload_hits.csv and bench_out/offload.png.

Then the decode timeline (moe.offload.timeline): milliseconds per token on the hardware presets
(h100-mixtral, 4090-qwen3-30b-a3b, 4090-qwen3-30b-a3b-int4), on the calibrated synthetic trace
and on the routing of a trained MoE LM (benchmarks/data/trained_tinylm_trace.safetensors, made by
benchmarks/trained_trace.py), for lru, lfu, predictive (the default), predictive_cpu (misses
computed on the CPU when faster), belady and oracle; ratios to LRU and to the oracle; written to
bench_out/offload.csv (trace, preset, fraction, policy, hit_rate, ready_rate, bytes_per_token,
sim_ms_per_token, ...), with the issue-15 targets checked at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moe.offload as mo  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402

POLICIES = ("lru", "lfu", "predictive", "belady")

# Calibrated setting (assumptions, stated in the report): E=64, k=8 like OLMoE/Qwen3-MoE; the next
# layer's router on the current hidden state recalls ~70% of its top-k (cross_layer=0.9); ~42% of a
# token's experts are reused by the next token at the same layer (reuse=0.8; 12.5% if random).
CALIBRATED = mo.SyntheticConfig(num_layers=16, num_experts=64, top_k=8, tokens=300, cross_layer=0.9, reuse=0.8)
VARIANTS = {
    "calibrated": {},
    "no-reuse": {"reuse": 0.0},
    "no-cross-layer": {"cross_layer": 0.0},
    "token-identity": {"token_identity": 0.9, "reuse": 0.3},
    "high-cross-layer": {"cross_layer": 0.97},
}


def trace_stats(trace: mo.Trace) -> dict[str, float]:
    """Consecutive-token reuse at a layer and 1-layer-ahead prediction recall (token-level traces)."""
    layers = trace.num_layers
    reuse_hit = reuse_tot = rec_hit = rec_tot = 0
    for s in range(trace.num_steps):
        need = set(trace.needed(s))
        if s + layers < trace.num_steps:
            reuse_hit += len(need & set(trace.needed(s + layers)))
            reuse_tot += len(need)
        if trace.ahead_SAE is not None and s + 1 < trace.num_steps and int(trace.layer_S[s]) + 1 < layers:
            pred = set((trace.ahead_SAE[s, 0] > 0).nonzero().flatten().tolist())
            nxt = set(trace.needed(s + 1))
            rec_hit += len(pred & nxt)
            rec_tot += len(nxt)
    return {"reuse": reuse_hit / max(reuse_tot, 1), "recall1": rec_hit / max(rec_tot, 1)}


def record_random_model(tokens: int) -> mo.Trace:
    """Routing of a small random Mixtral (patched, in memory) while it generates `tokens` tokens."""
    import transformers

    from moe.integrations.transformers import patch

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=32, num_experts_per_tok=4,
        max_position_embeddings=1024,
    )  # fmt: skip
    with tempfile.TemporaryDirectory():
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        patch(model)
        with mo.TraceRecorder(model, lookahead=1) as rec, torch.no_grad():
            model.generate(torch.tensor([list(b"Experts route tokens")]), max_new_tokens=tokens, do_sample=False)
    # Drop the prefill steps (one per layer) so the trace is token by token like the synthetic ones.
    full = rec.trace("recorded: random Mixtral 8L x 32E top-4")
    return full.select(torch.arange(full.num_layers, full.num_steps))


def run(name: str, trace: mo.Trace, sizes: list[float], rows: list[dict[str, object]]) -> None:
    stats = trace_stats(trace)
    print(
        f"\n## {name}: {trace.num_layers} layers x {trace.num_experts} experts, {trace.num_steps} steps; "
        f"next-token reuse {stats['reuse']:.2f}, 1-ahead recall {stats['recall1']:.2f}"
    )
    print(f"{'cache':>12} | " + " | ".join(f"{p:>16}" for p in POLICIES) + " |    iid | pred/belady | pred-lru")
    print(f"{'':>12} | " + " | ".join(f"{'hit  ready':>16}" for _ in POLICIES) + " |        |   (hit)    | (ready,pts)")
    for frac in sizes:
        cap = max(1, round(frac * trace.num_experts))
        res = {p: mo.simulate(trace, p, cap) for p in POLICIES}
        iid = mo.iid_hit_rate(trace, cap)
        # Belady's MIN bounds hit rates (transfers), not ready rates: a prefetcher can exceed it there.
        ratio = res["predictive"].hit_rate / max(res["belady"].hit_rate, 1e-9)
        gain = 100 * (res["predictive"].ready_rate - res["lru"].ready_rate)
        cells = " | ".join(f"{res[p].hit_rate:7.3f} {res[p].ready_rate:6.3f}  " for p in POLICIES)
        print(f"{cap:>4} ({frac:5.1%}) | {cells}| {iid:6.3f} | {ratio:10.2f} | {gain:+8.1f}")
        for p in POLICIES:
            s = res[p]
            rows.append(
                dict(trace=name, capacity=cap, fraction=frac, policy=p, hit_rate=round(s.hit_rate, 4),
                     ready_rate=round(s.ready_rate, 4), prefetches=s.prefetches,
                     wasted_prefetches=s.wasted_prefetches, iid=round(iid, 4))
            )  # fmt: skip


TRAINED = os.path.join(_HERE, "data", "trained_tinylm_trace.safetensors")
TIMELINE = ("lru", "lfu", "predictive", "predictive_cpu", "belady", "oracle", "resident")


def run_timeline(name: str, trace: mo.Trace, sizes: list[float], rows: list[dict[str, object]]) -> None:
    """Timeline rows of every preset and size; prints ms/token with ratios to LRU and the oracle."""
    from moe.offload import timeline

    print(f"\n## timeline, {name}: ms/token (x LRU, x oracle) and hit rate")
    print(f"{'preset':>24} {'cache':>12} | " + " | ".join(f"{p:>22}" for p in TIMELINE))
    for preset, hw in timeline.PRESETS.items():
        for frac in sizes:
            cap = max(1, round(frac * trace.num_experts))
            res = {r.policy: r for r in timeline.compare(trace, cap, hw, TIMELINE)}
            lru, oracle = res["lru"].ms_per_token, res["oracle"].ms_per_token
            cells = " | ".join(
                f"{r.ms_per_token:8.2f} ({r.ms_per_token / lru:4.2f},{r.ms_per_token / oracle:4.2f}) {r.hit_rate:4.2f}"
                for r in res.values()
            )
            print(f"{preset:>24} {cap:>4} ({frac:5.1%}) | {cells}")
            for r in res.values():
                rows.append(
                    dict(trace=name, preset=preset, fraction=frac, capacity=cap, policy=r.policy,
                         hit_rate=round(r.hit_rate, 4), ready_rate=round(r.ready_rate, 4),
                         hit_vs_belady=round(r.hit_rate / max(res["belady"].hit_rate, 1e-9), 4),
                         bytes_per_token=round(r.bytes_per_token), sim_ms_per_token=round(r.ms_per_token, 4),
                         stall_ms_per_token=round(r.stall_ms_per_token, 4), vs_lru=round(r.ms_per_token / lru, 4),
                         vs_oracle=round(r.ms_per_token / oracle, 4),
                         prefetch_precision=round(r.prefetch_precision, 4),
                         prefetch_recall=round(r.prefetch_recall, 4))
                )  # fmt: skip


def check_targets(rows: list[dict[str, object]]) -> None:
    """Issue 15's targets at 25% of the experts, per trace: met / not met with the numbers."""
    at = {(r["trace"], r["preset"], r["policy"]): r for r in rows if r["fraction"] == 0.25}
    print("\n## targets at 25% cache (default policy = predictive)")
    for trace in sorted({str(k[0]) for k in at}):
        for preset in sorted({str(k[1]) for k in at if k[0] == trace}):
            pred, lru = at[(trace, preset, "predictive")], at[(trace, preset, "lru")]
            ok = pred["hit_rate"] >= lru["hit_rate"] and pred["vs_lru"] <= 1.0  # type: ignore[operator]
            print(
                f"{trace} / {preset}: (a) never worse than LRU: hit {pred['hit_rate']} vs {lru['hit_rate']}, "
                f"ms x{pred['vs_lru']} -> {'met' if ok else 'NOT met'}"
            )
        q4 = at.get((trace, "4090-qwen3-30b-a3b-int4", "predictive"))
        if q4 is not None:
            ok = q4["vs_lru"] <= 0.8 and q4["vs_oracle"] <= 1.25  # type: ignore[operator]
            print(f"{trace}: (b) int4: x{q4['vs_lru']} LRU (<= 0.8), x{q4['vs_oracle']} oracle (<= 1.25) -> "
                  f"{'met' if ok else 'NOT met'}")  # fmt: skip
        cpu = at.get((trace, "h100-mixtral", "predictive_cpu"))
        if cpu is not None:
            print(f"{trace}: (c) h100-mixtral with CPU misses: x{cpu['vs_lru']} LRU (<= 0.75) -> "
                  f"{'met' if cpu['vs_lru'] <= 0.75 else 'NOT met'}")  # type: ignore[operator]  # fmt: skip
        hits = {p: at[(trace, "h100-mixtral", p)]["hit_vs_belady"] for p in ("lru", "lfu", "predictive")}
        print(f"{trace}: (d) hit rate / Belady's: {hits}")


def run_confidence_sweep(name: str, trace: mo.Trace) -> None:
    """ms/token (x LRU) and hit rate (- LRU's) of predictive per min_confidence, int4 preset.

    Where copies and compute are comparable every guess the link can take looks free, but a wrong
    one evicts an expert that may be needed again: the floor trades ms/token against traffic.
    """
    from moe.offload import timeline

    hw = timeline.PRESETS["4090-qwen3-30b-a3b-int4"]
    floors = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3)
    print(f"\n## min_confidence sweep, {name}, {hw.name}: ms x LRU / hit - LRU's (default {mo.MIN_CONFIDENCE})")
    for frac in (0.25, 0.5):
        cap = max(1, round(frac * trace.num_experts))
        lru = timeline.simulate_timeline(trace, "lru", cap, hw)
        cells = []
        for floor in floors:
            r = timeline.simulate_timeline(trace, "predictive", cap, hw, min_confidence=floor)
            cells.append(f"{floor}: {r.ms_per_token / lru.ms_per_token:.3f} / {r.hit_rate - lru.hit_rate:+.3f}")
        print(f"{frac:5.1%} | " + " | ".join(cells))


def lru_hit_curves(trace: mo.Trace) -> torch.Tensor:
    """[L, E + 1] LRU hits of each layer at 0..E experts (Mattson's stack distances, one pass)."""
    hits = torch.zeros(trace.num_layers, trace.num_experts + 1)
    stacks: list[list[int]] = [[] for _ in range(trace.num_layers)]
    for s in range(trace.num_steps):
        layer = int(trace.layer_S[s])
        stack = stacks[layer]
        for e in sorted(trace.needed(s)):
            if e in stack:
                hits[layer, stack.index(e) + 1 :] += 1
                stack.remove(e)
            stack.insert(0, e)
    return hits


def split_by_hit_curves(hits: torch.Tensor, total: int) -> list[int]:
    """Experts per layer (>= 1 each, `total` in all) that maximise the curves' hits (AdapMoE-style).

    Greedy on the best hits per expert over any jump, not the next expert only: below k experts
    per layer an LRU curve is flat (a step's own experts evict each other), so single steps stall.
    """
    layers, most = hits.shape[0], hits.shape[1] - 1
    caps, left = [1] * layers, total - layers
    while left > 0:
        jumps = [
            (float(hits[i, c] - hits[i, caps[i]]) / (c - caps[i]), i, c)
            for i in range(layers)
            for c in range(caps[i] + 1, min(most, caps[i] + left) + 1)
        ]
        if not jumps:
            break
        _, i, c = max(jumps)
        left, caps[i] = left - (c - caps[i]), c
    return caps


def run_budget_split(name: str, trace: mo.Trace) -> None:
    """Per-layer budgets from hit curves fitted on the first half, judged on the second half,
    against the even split and one global pool (issue 15, 4c)."""
    from moe.offload import timeline

    half = trace.num_steps // 2 // trace.num_layers * trace.num_layers
    fit, held = trace.select(torch.arange(half)), trace.select(torch.arange(half, trace.num_steps))
    print(f"\n## per-layer budgets from hit curves, {name} (fit: first half, judged: second half); ms x even LRU / hit")
    curves = lru_hit_curves(fit)
    for frac in (0.125, 0.25, 0.5):
        cap = max(1, round(frac * trace.num_experts))
        caps = split_by_hit_curves(curves, cap * trace.num_layers)
        for preset in ("h100-mixtral", "4090-qwen3-30b-a3b-int4"):
            hw = timeline.PRESETS[preset]
            base = timeline.simulate_timeline(held, "lru", cap, hw).ms_per_token
            cells = []
            for policy in ("lru", "predictive"):
                even = timeline.simulate_timeline(held, policy, cap, hw)
                pooled = timeline.simulate_timeline(held, policy, cap, hw, scope="global")
                split = timeline.simulate_timeline(held, policy, cap, hw, layer_capacities=caps)
                cells += [f"{policy} {label} {r.ms_per_token / base:.3f}/{r.hit_rate:.3f}"
                          for label, r in (("even", even), ("global", pooled), ("split", split))]  # fmt: skip
            print(f"{preset:>24} {frac:5.1%} {caps} | " + " | ".join(cells))


def plot(rows: list[dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({str(r["trace"]) for r in rows})
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.5), squeeze=False)
    for ax, name in zip(axes[0], traces, strict=True):
        for p in POLICIES:
            pts = [(r["fraction"], r["ready_rate"]) for r in rows if r["trace"] == name and r["policy"] == p]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} (ready)")
        iid = [(r["fraction"], r["iid"]) for r in rows if r["trace"] == name and r["policy"] == "lru"]
        ax.plot([x for x, _ in iid], [y for _, y in iid], "k--", label="iid")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cache (fraction of experts)")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("rate")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", nargs="*", default=[], help="recorded trace files (.safetensors)")
    p.add_argument("--sizes", nargs="*", type=float, default=[0.125, 0.25, 0.5])
    p.add_argument("--quick", action="store_true", help="short traces")
    p.add_argument("--no-record", action="store_true", help="skip recording a random model's trace")
    p.add_argument("--no-timeline", action="store_true", help="hit rates only")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    base = replace(CALIBRATED, tokens=60) if args.quick else CALIBRATED
    for name, change in VARIANTS.items():
        run(f"synthetic {name}", mo.synthetic_trace(replace(base, **change)), args.sizes, rows)
    for path in args.trace:
        run(os.path.basename(path), mo.Trace.load(path), args.sizes, rows)
    if not args.no_record:
        run("recorded random Mixtral", record_random_model(16 if args.quick else 96), args.sizes, rows)
    hits_path = os.path.join(args.out, "offload_hits.csv")
    harness.write_csv(hits_path, rows)
    plot(rows, os.path.join(args.out, "offload.png"))
    print(f"\nwrote {hits_path} and offload.png in {time.perf_counter() - start:.0f}s")
    if args.no_timeline:
        return
    timeline_rows: list[dict[str, object]] = []
    run_timeline("synthetic calibrated", mo.synthetic_trace(base), args.sizes, timeline_rows)
    trained = mo.Trace.load(TRAINED)
    if args.quick:  # the first 32 tokens
        trained = trained.select(torch.arange(min(trained.num_steps, 32 * trained.num_layers)))
    run_timeline("trained tiny LM", trained, args.sizes, timeline_rows)
    for path in args.trace:
        run_timeline(os.path.basename(path), mo.Trace.load(path), args.sizes, timeline_rows)
    check_targets(timeline_rows)
    if not args.quick:
        for name, trace in (("synthetic calibrated", mo.synthetic_trace(base)), ("trained tiny LM", trained)):
            run_confidence_sweep(name, trace)
            run_budget_split(name, trace)
    csv_path = os.path.join(args.out, "offload.csv")
    harness.write_csv(csv_path, timeline_rows)
    print(f"\nwrote {csv_path} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
