"""Offloaded decode speed against the transfer lower bound (issue 6 GPU target: measured <= 1.3x bound).

    python3 benchmarks/offload_decode.py                          # cuda: random bf16 Mixtral, ~4.4 GB of experts
    python3 benchmarks/offload_decode.py --device cpu --small     # CPU smoke (bound vs memcpy bandwidth)
    python3 benchmarks/offload_decode.py --cache-frac 0.5 --tokens 128 --repeats 3 --csv

Builds a random Mixtral-family model big enough that experts dominate, saves it with safetensors,
loads it once per policy with moe.offload.load (expert cache = --cache-frac of all expert bytes,
misses copied: --miss copy) plus once with a cache of 100% and every expert made resident
("resident": the compute-only reference), and times greedy decode of --tokens tokens, one token
per step, after a warm-up decode; the policies are interleaved over --repeats and medians reported.

Per policy, over the timed decode steps only (prefill excluded; counters are CacheStats deltas):
    hit        1 - (copies + prefetches + CPU misses) / requests (the traffic view; moe.offload.CacheStats)
    moved      bytes copied host -> device per token (demand copies + prefetches)
    h2d        measured bandwidth: a copy of one expert's bytes from pinned memory (median of
               --bw-repeats, measured in this run); on the CPU, a memcpy of the same bytes
    compute    seconds per token of the "resident" run (every expert on the device)
    bound      max(moved / h2d, compute): REFERENCES.md's max((1 - h) k L bytes_per_expert / bw, compute)
               with the achieved traffic in place of (1 - h) k L bytes_per_expert (the two agree at
               batch 1 when every miss is copied; the formula's value is printed beside it as "formula")
    ratio      measured seconds per token / bound (target <= 1.3): how well copies overlap compute
               for the traffic this policy chose (a policy that moves more gets a looser bound)
    floor      max(Belady's transfers for the same routing trace and cache size / h2d, compute): the
               physical floor (no policy can move fewer bytes); measured/floor is the whole gap
    same       the policy generated exactly the resident run's tokens (every repeat)
Writes bench_out/offload_decode.csv with --csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moe.offload as mo  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402

POLICIES = ("lru", "lfu", "predictive")
RESIDENT = "resident"


@dataclass(frozen=True)
class ModelSpec:
    """Random Mixtral shape: hidden D, expert intermediate I, E experts, top-k, L layers."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (gate, up and down projections)."""
        return 3 * self.hidden * self.intermediate * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def total_expert_bytes(self) -> int:
        return self.experts * self.layers * self.expert_bytes


CUDA_SPEC = ModelSpec(
    hidden=2048, intermediate=5632, experts=8, top_k=2, layers=8, heads=16, kv_heads=8, vocab=4096, dtype="bfloat16"
)
SMALL_SPEC = ModelSpec(
    hidden=64, intermediate=128, experts=8, top_k=2, layers=4, heads=4, kv_heads=2, vocab=256, dtype="float32"
)


def build_model(path: str, spec: ModelSpec, seed: int = 0) -> None:
    """Saves a random Mixtral of `spec` (safetensors) with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k, max_position_embeddings=1024,
        eos_token_id=None, pad_token_id=None, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    cfg.dtype = spec.torch_dtype
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=spec.torch_dtype)
    model.save_pretrained(path)
    del model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one synchronised host -> device copy of nbytes from pinned memory (on the
    CPU, a memcpy), after two warm-up copies."""
    cuda = device.type == "cuda"
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        if i >= 2:  # two warm-up copies
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_h2d(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes/s of one host -> device copy of nbytes (median of repeats)."""
    return nbytes / max(copy_seconds(nbytes, device, repeats), 1e-12)


def measure_h2d_latency(device: torch.device, repeats: int, nbytes: int = 4096) -> float:
    """Seconds of one small (4 KiB) copy: the per-copy cost a timeline model adds to bytes / bandwidth."""
    return copy_seconds(nbytes, device, repeats)


def save_trace(cand: Candidate, args: argparse.Namespace, spec: ModelSpec) -> None:
    """Writes the routing `cand` recorded (every forward since loading: the warm-up decode, then each
    repeat's, each a prefill of --prompt-len tokens and --tokens one-token steps; one trace step per
    layer and forward) with moe.offload.Trace.save, for replaying the measured run offline."""
    trace = cand.om.runtime.recorded_trace()
    trace.source = (
        f"offload_decode {cand.name} on {args.device}: model {spec}; forwards = (1 warm-up + {args.repeats} "
        f"repeats) x (prefill {args.prompt_len} tokens + {args.tokens} steps); warm-up decode {args.warmup} steps"
    )
    trace.save(args.trace_out)
    print(f"wrote {args.trace_out} ({trace.num_steps} steps, policy {cand.name})")


def _stats(om: mo.OffloadedModel) -> mo.CacheStats:
    return dataclasses.replace(om.runtime.stats)


def _delta(after: mo.CacheStats, before: mo.CacheStats) -> mo.CacheStats:
    return mo.CacheStats(
        **{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    )


@torch.no_grad()
def decode(
    om: mo.OffloadedModel, prompt_1P: torch.Tensor, steps: int, device: torch.device
) -> tuple[list[int], float, mo.CacheStats]:
    """Greedy decode: prefill the prompt (untimed), then `steps` one-token steps (timed).

    Returns:
        (tokens: the prefill's token then one per step, decode seconds, CacheStats of the steps).
    """
    out = om.model(input_ids=prompt_1P, use_cache=True)
    cache = out.past_key_values
    next_11 = out.logits[:, -1:].argmax(-1)
    tokens = [int(next_11)]
    sync(device)
    before = _stats(om)
    start = time.perf_counter()
    for _ in range(steps):
        out = om.model(input_ids=next_11, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_11 = out.logits[:, -1:].argmax(-1)
        tokens.append(int(next_11))  # syncs
    sync(device)
    seconds = time.perf_counter() - start
    return tokens, seconds, _delta(_stats(om), before)


def make_all_resident(om: mo.OffloadedModel) -> None:
    """Copies every expert to the device cache (the budget must hold them all)."""
    rt = om.runtime
    for layer in range(rt.num_layers):
        for e, _ in rt.engine.step(layer, list(range(rt.num_experts[layer]))):
            rt.store.ready((layer, e))
    sync(rt.store.device)


def warm_ram(om: mo.OffloadedModel) -> None:
    """Reads every expert into the RAM tier (pinned on CUDA) so that timed misses are host -> device copies."""
    rt = om.runtime
    for layer in range(rt.num_layers):
        for e in range(rt.num_experts[layer]):
            rt.store.host((layer, e))


@dataclass
class Candidate:
    name: str
    cache_bytes: int
    om: mo.OffloadedModel
    seconds: list[float] = dataclasses.field(default_factory=list)
    stats: list[mo.CacheStats] = dataclasses.field(default_factory=list)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Builds, loads, decodes and returns one row per candidate ("resident" first)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False: pass --device cpu --small")
    spec = SMALL_SPEC if args.small else CUDA_SPEC
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 < args.cache_frac <= 1.0:
        raise SystemExit(f"--cache-frac must be in (0, 1], got {args.cache_frac}")
    eb = spec.expert_bytes
    per_layer = max(1, int(args.cache_frac * spec.experts))
    cache_bytes = per_layer * spec.layers * eb
    log = print if args.verbose else (lambda *a, **k: None)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "random-mixtral")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            start = time.perf_counter()
            build_model(model_dir, spec, args.seed)
            log(f"built + saved {spec} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        gen = torch.Generator().manual_seed(args.seed)
        prompt_1P = torch.randint(0, spec.vocab, (1, args.prompt_len), generator=gen).to(device)
        budgets = [(RESIDENT, spec.total_expert_bytes)] + [(p, cache_bytes) for p in args.policies]
        cands = []
        try:
            for name, budget in budgets:
                start = time.perf_counter()
                config = mo.OffloadConfig(
                    expert_cache_bytes=budget, policy="lru" if name == RESIDENT else name, miss=args.miss,
                    lookahead=args.lookahead, record_trace=name != RESIDENT,
                )  # fmt: skip
                om = mo.load(model_dir, device, config=config, dtype=spec.torch_dtype)
                warm_ram(om)
                if name == RESIDENT:
                    make_all_resident(om)
                decode(om, prompt_1P, args.warmup, device)  # kernels, allocator, cache state
                cands.append(Candidate(name, budget, om))
                log(f"loaded + warmed {name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
            bw = []
            for r in range(args.repeats):
                bw.append(measure_h2d(eb, device, args.bw_repeats))
                for c in cands:  # interleaved
                    tokens, seconds, stats = decode(c.om, prompt_1P, args.tokens, device)
                    c.tokens.append(tokens)
                    c.seconds.append(seconds)
                    c.stats.append(stats)
                    log(f"repeat {r} {c.name}: {args.tokens / seconds:.2f} tok/s", file=sys.stderr)
            bw.append(measure_h2d(eb, device, args.bw_repeats))
            # Every policy decodes the same tokens, so one routing trace serves all: Belady's MIN
            # on it, at the same cache size, is the fewest transfers any policy could make.
            latency = measure_h2d_latency(device, args.bw_repeats)
            trace = cands[1].om.runtime.recorded_trace() if len(cands) > 1 else None
            belady = mo.simulate(trace, "belady", per_layer) if trace is not None else None
            if args.trace_out and len(cands) > 1:
                save_trace(cands[-1], args, spec)
            timers = {c.name: (dict(c.om.runtime.host_seconds), dict(c.om.runtime.host_calls)) for c in cands}
        finally:
            for c in cands:
                c.om.close()
    h2d = statistics.median(bw)
    ref = cands[0]
    compute_s = statistics.median(ref.seconds) / args.tokens
    sim = simulated_ms_per_token(args, trace, timers, compute_s, h2d, latency, per_layer, device)
    rows = []
    for c in cands:
        per_token = statistics.median(c.seconds) / args.tokens
        requests = sum(s.requests for s in c.stats)
        transfers = sum(s.copies + s.prefetches + s.cpu_misses for s in c.stats)
        hit = 1.0 - transfers / requests if requests else 0.0
        ready = sum(s.hits for s in c.stats) / requests if requests else 0.0
        moved = sum(s.bytes_moved for s in c.stats) / (args.tokens * len(c.stats))
        transfer_s = moved / h2d
        formula_s = (1.0 - hit) * spec.top_k * spec.layers * eb / h2d
        bound = max(transfer_s, compute_s)
        # The physical floor: Belady's transfers per request, times this run's requests per token.
        belady_miss = 1.0 - belady.hit_rate if belady is not None else 0.0
        floor_s = max(belady_miss * requests / (args.tokens * len(c.stats)) * eb / h2d, compute_s)
        rows.append(
            {
                "policy": c.name,
                "cache_experts_per_layer": c.cache_bytes // (eb * spec.layers),
                "tokens_per_s": 1.0 / per_token,
                "ms_per_token": 1e3 * per_token,
                "hit_rate": hit,
                "ready_rate": ready,
                "mib_moved_per_token": moved / 2**20,
                "cpu_misses": sum(s.cpu_misses for s in c.stats),
                "h2d_gb_s": h2d / 1e9,
                "h2d_latency_us": 1e6 * latency,
                "transfer_ms": 1e3 * transfer_s,
                "formula_ms": 1e3 * formula_s,
                "compute_ms": 1e3 * compute_s,
                "bound_ms": 1e3 * bound,
                "ratio": per_token / bound,
                "floor_ms": 1e3 * floor_s,
                "ratio_floor": per_token / floor_s,
                "sim_ms_per_token": sim.get(c.name, math.nan),
                "sim_error": sim.get(c.name, math.nan) / (1e3 * per_token) - 1.0,
                "same_tokens": all(t == ref.tokens[0] for t in c.tokens),
                "tokens": ref.tokens[0] if c is ref else c.tokens[0],
            }
        )
    return rows


def decode_steps(trace: mo.Trace, args: argparse.Namespace) -> mo.Trace:
    """`trace` without its prefill forwards: the timed decode steps are one token each.

    The recorded forwards are the warm-up decode (a prefill and --warmup steps), then each repeat's
    (a prefill and --tokens steps); a forward starts where the layer index does not increase.
    """
    starts = [s for s in range(trace.num_steps) if s == 0 or trace.layer_S[s] <= trace.layer_S[s - 1]]
    groups = [1 + args.warmup] + [1 + args.tokens] * args.repeats
    prefills, at = set(), 0
    for g in groups:
        prefills.add(at)
        at += g
    if at != len(starts):
        raise ValueError(f"the trace has {len(starts)} forwards, the run made {at}")
    keep = torch.ones(trace.num_steps, dtype=torch.bool)
    for i in prefills:
        end = starts[i + 1] if i + 1 < len(starts) else trace.num_steps
        keep[starts[i] : end] = False
    return trace.select(keep.nonzero().flatten())


def simulated_ms_per_token(
    args: argparse.Namespace,
    trace: mo.Trace | None,
    timers: dict[str, tuple[dict[str, float], dict[str, int]]],
    compute_s: float,
    h2d: float,
    latency: float,
    per_layer: int,
    device: torch.device,
) -> dict[str, float]:
    """The timeline's ms/token for each candidate, on this run's routing, from the "measured"
    preset: compute calibrated on the resident run, copies from the measured bandwidth and latency
    (on a CPU device no bytes move: the RAM tier is the device copy), host costs from the
    runtime's own timers (per copy over every candidate, per forecast of the predictive one)."""
    from moe.offload import timeline

    if trace is None:
        return {}
    fetch_s = sum(t[0]["fetch"] for t in timers.values())
    fetches = sum(t[1]["fetch"] for t in timers.values())
    pred_s, preds = timers.get("predictive", ({"forecast": 0.0}, {"forecast": 0}))
    cuda = device.type == "cuda"
    steps = decode_steps(trace, args)
    hw = timeline.measured_hardware(
        steps,
        resident_s_per_token=compute_s,
        h2d_bytes_per_s=h2d if cuda else math.inf,
        copy_latency_s=latency if cuda else 0.0,
        async_copies=cuda,
        host_share=args.sim_host_share,
        copy_host_s=fetch_s / fetches if fetches else 0.0,
        predict_host_s=pred_s["forecast"] / preds["forecast"] if preds["forecast"] else 0.0,
    )
    out = {RESIDENT: timeline.simulate_timeline(steps, "resident", per_layer, hw).ms_per_token}
    for name in timers:
        if name != RESIDENT:
            out[name] = timeline.simulate_timeline(steps, name, per_layer, hw, lookahead=args.lookahead).ms_per_token
    return out


COLUMNS = [
    ("policy", "policy", "{}"),
    ("cache_experts_per_layer", "cache/layer", "{}"),
    ("tokens_per_s", "tok/s", "{:.2f}"),
    ("ms_per_token", "ms/tok", "{:.2f}"),
    ("hit_rate", "hit", "{:.3f}"),
    ("ready_rate", "ready", "{:.3f}"),
    ("mib_moved_per_token", "MiB moved/tok", "{:.2f}"),
    ("h2d_gb_s", "h2d GB/s", "{:.2f}"),
    ("h2d_latency_us", "4 KiB copy us", "{:.1f}"),
    ("transfer_ms", "transfer ms/tok", "{:.3f}"),
    ("formula_ms", "formula ms/tok", "{:.3f}"),
    ("compute_ms", "compute ms/tok", "{:.3f}"),
    ("bound_ms", "bound ms/tok", "{:.3f}"),
    ("ratio", "measured/bound", "{:.2f}"),
    ("floor_ms", "Belady floor ms/tok", "{:.3f}"),
    ("ratio_floor", "measured/floor", "{:.2f}"),
    ("sim_ms_per_token", "timeline ms/tok", "{:.2f}"),
    ("sim_error", "timeline/measured - 1", "{:+.0%}"),
    ("same_tokens", "same tokens", "{}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny fp32 model (CPU smoke test)")
    p.add_argument("--tokens", type=int, default=64, help="timed decode steps per repeat")
    p.add_argument(
        "--warmup", type=int, help="untimed decode steps after loading (default --tokens: every KV length is seen once)"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed decodes per candidate (median)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--cache-frac", type=float, default=0.25, help="expert cache as a fraction of all experts")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--miss", default="copy", choices=["copy", "auto", "cpu"], help="moe.offload miss mode")
    p.add_argument("--lookahead", type=int, default=1)
    p.add_argument("--bw-repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", help="keep the random model here (built if it has no config.json; reused after)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--csv", action="store_true", help="write bench_out/offload_decode.csv")
    p.add_argument("--trace-out", help="write the last policy's routing here (moe.offload.Trace)")
    p.add_argument(
        "--sim-host-share",
        type=float,
        default=1.0,
        help="share of the resident time the timeline puts on the host (rest: device); batch 1 is host-bound",
    )
    p.add_argument("--verbose", action="store_true", help="progress lines on stderr")
    args = p.parse_args(argv)
    if args.warmup is None:  # cuDNN attention plans are per KV length: warm them all up, or the first run pays
        args.warmup = args.tokens
    if args.tokens < 1 or args.repeats < 1 or args.warmup < 0 or args.prompt_len < 1 or args.bw_repeats < 1:
        p.error("--tokens, --repeats, --prompt-len and --bw-repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = run(args)
    device = torch.device(args.device)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    spec = SMALL_SPEC if args.small else CUDA_SPEC
    print(
        f"device {args.device} ({what}), torch {torch.__version__}, {torch.get_num_threads()} threads; model {spec}; "
        f"expert {spec.expert_bytes / 2**20:.2f} MiB, all experts {spec.total_expert_bytes / 2**30:.2f} GiB; "
        f"{args.tokens} decode tokens x {args.repeats} repeats, miss={args.miss}\n"
        f"bound = max(moved bytes/token / h2d, resident compute/token) with achieved traffic (CacheStats.bytes_moved); "
        f"formula = (1 - hit) * k * L * expert bytes / h2d"
    )
    print(format_table(rows))
    worst = max((r["ratio"] for r in rows if r["policy"] != RESIDENT), default=math.nan)
    print(f"worst measured/bound over policies: {worst:.2f} (target <= 1.3)")
    if args.csv:
        os.makedirs("bench_out", exist_ok=True)
        path = os.path.join("bench_out", "offload_decode.csv")
        fields = [k for k in rows[0] if k != "tokens"]
        harness.write_csv(path, [{k: r[k] for k in fields} for r in rows], fieldnames=fields)
        print(f"wrote {path}")
    gc.collect()
    return rows


if __name__ == "__main__":
    main()
