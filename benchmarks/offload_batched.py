"""Batched offloaded decode on the timeline simulator: FIFO batches vs ExpertFlow-style regrouping.

    python benchmarks/offload_batched.py --out bench_out           # writes bench_out/offload_batched.csv
    python benchmarks/offload_batched.py --quick --out /tmp/b      # fewer settings (CI smoke)

Requests. A routing trace recorded token by token (one sequence of tokens, each with its experts
at every layer) is cut into requests of --request-tokens consecutive tokens; each request decodes
its tokens, and all requests are submitted at once (an offline batch job). The trained trace
(benchmarks/data/trained_tinylm_trace.safetensors: 8 held-out windows of 128 bytes) gives 8 cuts
per window, starting at position 1 (token 0 is the first request's prompt); the synthetic one is
one long calibrated stream (benchmarks/offload.py's CALIBRATED) cut the same way.

Prediction. The scheduler sees, per request, the experts its next token is predicted to use:
moe.offload.TokenRoutes, the experts earlier tokens with the same input id chose at each layer,
learned online during the run (the id of the token a step feeds is known before the step; the
trained trace's bytes are in benchmarks/data/trained_tinylm_tokens.safetensors, the synthetic
trace's ids come from moe.offload.synthetic.synthetic_tokens), falling back, for an id not seen
yet, to the request's previous token's experts (the router of every layer on its newest hidden
state). generate_batched uses the same predictor. Rows "regroup_previous" use only that fallback;
"regroup_oracle" sees the true next experts (a ceiling, not a predictor). What a step then loads
is always the true union.

Batched step. Per step and layer the experts needed are the union of the batch's tokens'
experts; each expert computes its tokens (Hardware.expert_row_s per row beyond the first), the
layer's own work Hardware.layer_row_s per token beyond the first (BATCH_ROWS below: compute
estimates, small beside a copy). The batched steps become a Trace replayed by
moe.offload.timeline.simulate_timeline with the presets; tokens/s = all tokens / all time.

Columns of offload_batched.csv: trace, preset, policy, fraction, capacity, batch_size, scheduler
(fifo, regroup, regroup_previous, regroup_oracle),
max_wait, pool_size, steps, mean_batch, distinct_experts_per_layer, copies_per_token,
sim_ms_per_token, tokens_per_s, vs_fifo (tokens/s ratio), max_wait_steps (longest a request was
left out: the bound held when <= max_wait).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moe.offload as mo  # noqa: E402
from moe.offload import timeline  # noqa: E402
from moe.offload.schedule import BatchQueue, SchedulerConfig, TokenRoutes  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
import bench_harness as harness  # noqa: E402

TRAINED = os.path.join(_HERE, "data", "trained_tinylm_trace.safetensors")
# The input byte of each of its 1024 positions: examples/tiny_lm.py's held-out text, saved beside it.
TRAINED_TOKENS = os.path.join(_HERE, "data", "trained_tinylm_tokens.safetensors")
SYNTHETIC = mo.SyntheticConfig(num_layers=16, num_experts=64, top_k=8, tokens=1025, cross_layer=0.9, reuse=0.8)

# Device seconds per extra token of a batched step: (per expert row, per layer). An expert's
# row costs 2 flops a weight (bf16: one flop per byte) at ~40% of the GPU's dense bf16 peak; a
# layer's token costs reading its KV cache (~512 tokens of context) at the HBM / GDDR bandwidth.
BATCH_ROWS = {
    "h100-mixtral": (mo.timeline.PRESETS["h100-mixtral"].expert_bytes / 400e12, 2 * 8 * 128 * 2 * 512 / 2.7e12),
    "4090-qwen3-30b-a3b": (
        mo.timeline.PRESETS["4090-qwen3-30b-a3b"].expert_bytes / 66e12,
        2 * 4 * 128 * 2 * 512 / 0.7e12,
    ),
    # int4: the same flops as bf16 (dequantised first), twice the time for the dequantisation.
    "4090-qwen3-30b-a3b-int4": (
        2 * mo.timeline.PRESETS["4090-qwen3-30b-a3b"].expert_bytes / 66e12,
        2 * 4 * 128 * 2 * 512 / 0.7e12,
    ),
}


@dataclasses.dataclass
class Request:
    """One request of a trace: the trace steps of each of its tokens, and of the token before."""

    prompt_steps: list[int]  # the last prompt token's layer steps (the first prediction)
    token_steps: list[list[int]]  # per decoded token, its layer steps in layer order
    token_ids: list[int] | None = None  # the id of each decoded token's input (None: unknown)


def requests_from_trace(
    trace: mo.Trace, window: int, tokens: int, token_ids: torch.Tensor | None = None
) -> list[Request]:
    """Cuts a token-by-token trace into requests of `tokens` tokens, within windows of `window`
    tokens (a window is one recorded sequence), starting at position 1 of each window;
    token_ids [T]: the input token of each position (for the token-id predictor)."""
    layers = trace.num_layers
    if trace.num_steps % layers:
        raise ValueError(f"trace has {trace.num_steps} steps, not a whole number of {layers}-layer tokens")
    total = trace.num_steps // layers
    out = []
    for w0 in range(0, total - window + 1, window):
        for p in range(w0 + 1, w0 + window, tokens):
            end = min(p + tokens, w0 + window)
            steps = [[t * layers + layer for layer in range(layers)] for t in range(p - 1, end)]
            ids = None if token_ids is None else [int(i) for i in token_ids[p:end]]
            out.append(Request(steps[0], steps[1:], ids))
    return out


def _keys(trace: mo.Trace, steps: list[int]) -> frozenset[tuple[int, int]]:
    return frozenset((int(trace.layer_S[s]), e) for s in steps for e in trace.needed(s))


@dataclasses.dataclass
class Schedule:
    """A batched run: the batched trace and its per-step token and row counts."""

    trace: mo.Trace
    tokens_S: torch.Tensor
    rows_SE: torch.Tensor
    steps: int
    tokens: int
    max_wait_steps: int


PREDICTORS = ("previous", "tokens", "oracle")


def schedule_requests(
    trace: mo.Trace, requests: list[Request], config: SchedulerConfig, predictor: str = "tokens"
) -> Schedule:
    """Runs the scheduler over the requests and builds the batched trace (union per layer step).

    predictor: what regroup sees of a request's next token: "previous" (its previous token's
    experts), "tokens" (moe.offload.TokenRoutes on its input token id, learned online, falling
    back to "previous"; what generate_batched does), "oracle" (the true experts: a ceiling).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    queue = BatchQueue(len(requests), config)
    done = [0] * len(requests)  # tokens decoded per request
    last = [_keys(trace, r.prompt_steps) for r in requests]  # the newest token's experts
    table = TokenRoutes()
    layers, experts = trace.num_layers, trace.num_experts
    builder = mo.TraceBuilder(layers, experts, trace.lookahead)
    tokens_S: list[int] = []
    rows: list[torch.Tensor] = []
    steps = tokens = 0
    while not queue.done:
        queue.admit()
        seen = {}
        for r in queue.active:
            req = requests[r]
            if predictor == "oracle":
                seen[r] = _keys(trace, req.token_steps[done[r]])
            elif predictor == "tokens" and req.token_ids is not None:
                seen[r] = table.predict(req.token_ids[done[r]], last[r])
            else:
                seen[r] = last[r]
        batch = queue.next_batch(seen)
        token_steps = [requests[r].token_steps[done[r]] for r in batch]
        for layer in range(layers):
            at = [ts[layer] for ts in token_steps]
            count_E = torch.zeros(experts, dtype=torch.int64)
            for s in at:
                count_E[trace.needed(s)] += 1
            probs = trace.probs_SE[at].mean(0) if trace.probs_SE is not None else None
            ahead = []
            if trace.ahead_SAE is not None:
                mean_AE = trace.ahead_SAE[at].mean(0)
                ahead = [(layer + j + 1, mean_AE[j]) for j in range(trace.lookahead) if layer + j + 1 < layers]
            builder.add(layer, count_E.nonzero().flatten().tolist(), probs, ahead)
            tokens_S.append(len(batch))
            rows.append(count_E)
        for r, ts in zip(batch, token_steps, strict=True):
            last[r] = _keys(trace, ts)
            if requests[r].token_ids is not None:
                table.observe(requests[r].token_ids[done[r]], last[r])  # type: ignore[index]
            done[r] += 1
            if done[r] == len(requests[r].token_steps):
                queue.finished(r)
        steps += 1
        tokens += len(batch)
    return Schedule(
        builder.build(expert_bytes=trace.expert_bytes, source=trace.source),
        torch.tensor(tokens_S),
        torch.stack(rows),
        steps,
        tokens,
        queue.max_wait_seen,
    )


def run(
    name: str,
    trace: mo.Trace,
    requests: list[Request],
    batch_sizes: list[int],
    fractions: list[float],
    max_waits: list[int],
    policies: list[str],
    presets: list[str],
    rows: list[dict[str, object]],
) -> None:
    """Rows for every batch size x scheduler x preset x cache size x policy of one trace."""
    print(f"\n## {name}: {len(requests)} requests, {sum(len(r.token_steps) for r in requests)} tokens")
    print("scheduler: experts per layer step, ms/token, tokens/s x FIFO, longest wait")
    for b in batch_sizes:
        runs = {("fifo", 0): (SchedulerConfig(kind="fifo", batch_size=b), "tokens")}
        for mw in max_waits:
            runs[("regroup", mw)] = (SchedulerConfig(kind="regroup", batch_size=b, max_wait=mw), "tokens")
            runs[("regroup_previous", mw)] = (SchedulerConfig(kind="regroup", batch_size=b, max_wait=mw), "previous")
            runs[("regroup_oracle", mw)] = (SchedulerConfig(kind="regroup", batch_size=b, max_wait=mw), "oracle")
        scheds = {key: schedule_requests(trace, requests, cfg, pred) for key, (cfg, pred) in runs.items()}
        for preset in presets:
            base = timeline.PRESETS[preset]
            hw = dataclasses.replace(base, expert_row_s=BATCH_ROWS[preset][0], layer_row_s=BATCH_ROWS[preset][1])
            for frac in fractions:
                cap = max(1, round(frac * trace.num_experts))
                for policy in policies:
                    cells = []
                    fifo_ms = 0.0
                    for (kind, mw), sc in scheds.items():
                        r = timeline.simulate_timeline(
                            sc.trace, policy, cap, hw, tokens_S=sc.tokens_S, rows_SE=sc.rows_SE
                        )
                        fifo_ms = fifo_ms or r.ms_per_token
                        distinct = float((sc.trace.experts_SM >= 0).sum()) / sc.trace.num_steps
                        label = kind if kind == "fifo" else f"{kind}(w{mw})"
                        speed = fifo_ms / r.ms_per_token
                        cells.append(f"{label} {distinct:.2f} {r.ms_per_token:.3f} x{speed:.2f} {sc.max_wait_steps}")
                        rows.append(
                            dict(trace=name, preset=preset, policy=policy, fraction=frac, capacity=cap,
                                 batch_size=b, scheduler=kind, max_wait=mw, pool_size=runs[(kind, mw)][0].pool,
                                 steps=sc.steps, mean_batch=round(sc.tokens / sc.steps, 3),
                                 distinct_experts_per_layer=round(distinct, 3),
                                 copies_per_token=round(r.bytes_per_token / hw.expert_bytes, 3),
                                 sim_ms_per_token=round(r.ms_per_token, 4),
                                 tokens_per_s=round(1e3 / r.ms_per_token, 2),
                                 vs_fifo=round(fifo_ms / r.ms_per_token, 4), max_wait_steps=sc.max_wait_steps)
                        )  # fmt: skip
                    print(f"{preset} {frac:.1%} {policy} B={b}: " + " | ".join(cells))


def check_targets(rows: list[dict[str, object]]) -> None:
    """Issue 18's targets at batch 16 and 25% cache, per trace, preset, policy and wait bound."""
    print("\n## targets at batch 16, 25% cache: regroup >= 20% fewer experts/layer step, >= 1.2x tokens/s, wait held")
    at = {
        (r["trace"], r["preset"], r["policy"], r["scheduler"], r["max_wait"]): r
        for r in rows
        if r["batch_size"] == 16 and r["fraction"] == 0.25
    }
    for key in sorted(at):  # type: ignore[type-var]
        trace, preset, policy, kind, mw = key
        if kind == "fifo":
            continue
        g, f = at[key], at[(trace, preset, policy, "fifo", 0)]
        fewer = 1 - float(g["distinct_experts_per_layer"]) / float(f["distinct_experts_per_layer"])  # type: ignore[arg-type]
        speed = float(g["vs_fifo"])  # type: ignore[arg-type]
        ok = fewer >= 0.2 and speed >= 1.2 and int(g["max_wait_steps"]) <= int(mw)  # type: ignore[call-overload]
        print(
            f"{trace} / {preset} / {policy} / {kind} (max wait {mw}): experts/layer {f['distinct_experts_per_layer']} "
            f"-> {g['distinct_experts_per_layer']} ({fewer:.1%} fewer), tokens/s x{speed:.2f}, longest wait "
            f"{g['max_wait_steps']} -> {'met' if ok else 'NOT met'}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 4, 8, 16, 32])
    p.add_argument("--sizes", nargs="*", type=float, default=[0.25, 0.5])
    p.add_argument("--max-wait", nargs="*", type=int, default=[4, 8], help="regroup: most steps a request is left out")
    p.add_argument("--request-tokens", type=int, default=16, help="tokens each request decodes")
    p.add_argument("--policies", nargs="*", default=["lru", "predictive"])
    p.add_argument("--presets", nargs="*", default=list(timeline.PRESETS), choices=list(timeline.PRESETS))
    p.add_argument(
        "--quick",
        action="store_true",
        help="batch 16, 25%% cache, LRU, h100-mixtral, max wait 8, a short synthetic trace",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.batch_sizes, args.sizes, args.policies, args.presets = [16], [0.25], ["lru"], ["h100-mixtral"]
        args.max_wait = [8]
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    trained = mo.Trace.load(TRAINED)
    from safetensors.torch import load_file

    reqs = requests_from_trace(trained, 128, args.request_tokens, load_file(TRAINED_TOKENS)["tokens_T"])
    common = (args.batch_sizes, args.sizes, args.max_wait, args.policies, args.presets, rows)
    run("trained tiny LM", trained, reqs, *common)
    synth_cfg = dataclasses.replace(SYNTHETIC, tokens=513) if args.quick else SYNTHETIC
    synth = mo.synthetic_trace(synth_cfg)
    synth_ids = mo.synthetic.synthetic_tokens(synth_cfg)
    run(
        "synthetic calibrated",
        synth,
        requests_from_trace(synth, synth_cfg.tokens, args.request_tokens, synth_ids),
        *common,
    )
    check_targets(rows)
    path = os.path.join(args.out, "offload_batched.csv")
    harness.write_csv(path, rows)
    print(f"\nwrote {path} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
