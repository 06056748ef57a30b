"""Decode timeline: what a cache policy costs in milliseconds per token, not only in hit rate.

The hit-rate simulator (moe.offload.simulate) counts transfers; it cannot say whether a prefetch
arrived in time or whether its bytes delayed a demand copy. This replays a Trace through the
same CacheEngine the runtime uses, on a model of one decode step:

    host   launches a layer's non-expert work (layer_host_s), then waits for the device to finish
           it (the router's choice is read on the host: one sync per layer), then asks the engine
           which experts are resident, starts copies, and launches each expert (expert_host_s);
           a miss computed on the CPU runs on the host thread (cpu_expert_s).
    device runs each launched op in order, no earlier than its launch (layer_device_s,
           expert_device_s per expert at batch 1); an expert waits until its copy has landed.
    link   copy_streams host -> device streams, each copy copy_latency_s + bytes / h2d_bytes_per_s.
           Demand copies go before every queued prefetch (not before one already copying);
           a queued prefetch whose expert is evicted is cancelled (its bytes never move);
           a queued prefetch the step now needs is started as a demand copy.
    token  ends with a host sync (the sampled token is read), so its time is the host clock.

With async_copies=False the link is the host thread itself (a CPU "device": RAM -> RAM tier).
Per policy it reports ms/token, stall ms/token (over the same trace with every expert resident),
bytes moved per token, hit and ready rates and prefetch precision / recall. Ceilings in the
same run: "belady" (fewest transfers, no prefetch), "oracle" (Belady eviction plus prefetching
each next step's experts; it knows the future) and "resident" (no copies at all).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass

import torch

from moe.offload.cache import Residency
from moe.offload.engine import MIN_CONFIDENCE, CacheEngine, link_budget
from moe.offload.policies import Belady, Key, Policy, make_policy
from moe.offload.trace import Trace
from moe.quant import quantized_expert_bytes

__all__ = [
    "Hardware",
    "PRESETS",
    "TIMELINE_POLICIES",
    "TimelineResult",
    "compare",
    "measured_hardware",
    "preset",
    "simulate_timeline",
]

TIMELINE_POLICIES = (
    "lru",
    "lfu",
    "predictive",
    "predictive_cpu",
    "belady",
    "oracle",
    "resident",
)
_PREFETCHING = ("predictive",)


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One machine and model, as the timeline sees them; every time is in seconds.

    Attributes:
        name: preset name.
        expert_bytes: bytes of one expert as it crosses the link.
        h2d_bytes_per_s: host -> device bandwidth of one copy stream (pinned memory).
        copy_latency_s: fixed cost of one copy (launch + completion), on top of bytes / bandwidth.
        copy_streams: copies that can run at once (they share nothing in this model).
        async_copies: False: copies run on the host thread (no overlap at all).
        layer_host_s / layer_device_s: host launch time and device time of one layer's non-expert
            work (attention, norms, router) at batch 1.
        expert_host_s / expert_device_s: the same for one expert.
        cpu_expert_s: one expert computed on the CPU for a one-token miss (memory-bound: expert bytes
            / CPU memory bandwidth); math.inf: never cheaper.
        copy_host_s: host time to issue one copy (allocation, the copy call, its event).
        predict_host_s: host time per layer step of the predictive policy's forecast (later
            layers' routers on the current hidden state, and reading their votes).
        expert_row_s / layer_row_s: device time of each token of a batched step beyond the first,
            per expert (its rows) and per layer (its non-expert work); see simulate_timeline's rows_SE.
        notes: where the numbers come from.
    """

    name: str
    expert_bytes: int
    h2d_bytes_per_s: float
    copy_latency_s: float
    layer_host_s: float
    layer_device_s: float
    expert_host_s: float
    expert_device_s: float
    cpu_expert_s: float = math.inf
    copy_host_s: float = 0.0
    predict_host_s: float = 0.0
    copy_streams: int = 1
    async_copies: bool = True
    notes: str = ""
    # Batched steps (simulate_timeline's rows_SE): device seconds per token beyond the first, per
    # expert and per layer (0: a step costs what one token does).
    expert_row_s: float = 0.0
    layer_row_s: float = 0.0

    def __post_init__(self) -> None:
        if self.expert_bytes < 1 or self.h2d_bytes_per_s <= 0:
            raise ValueError(f"{self.name}: expert_bytes and h2d_bytes_per_s must be positive")
        if self.copy_streams < 1:
            raise ValueError(f"{self.name}: copy_streams must be >= 1, got {self.copy_streams}")
        times = (
            self.copy_latency_s,
            self.layer_host_s,
            self.layer_device_s,
            self.expert_host_s,
            self.expert_device_s,
            self.copy_host_s,
            self.predict_host_s,
            self.expert_row_s,
            self.layer_row_s,
        )
        if min(times) < 0 or self.cpu_expert_s <= 0:
            raise ValueError(f"{self.name}: times must be >= 0 (cpu_expert_s > 0)")

    @property
    def copy_s(self) -> float:
        """Seconds of one expert copy: latency + bytes / bandwidth."""
        return self.copy_latency_s + self.expert_bytes / self.h2d_bytes_per_s


_GB = 1e9
_MIXTRAL_EXPERT = quantized_expert_bytes(4096, 14336, None)  # gate, up, down of Mixtral-8x7B in bf16: 352 MB
_QWEN3_A3B_EXPERT = quantized_expert_bytes(2048, 768, None)  # Qwen3-30B-A3B (2048, moe_intermediate 768), bf16: 9.4 MB
# moe.quant's int4 (group 64, fp16 scale + zero point per group): 4.5 bits a weight, 2.65 MB.
_QWEN3_A3B_EXPERT_INT4 = quantized_expert_bytes(2048, 768, "int4", group_size=64)

PRESETS: dict[str, Hardware] = {
    "h100-mixtral": Hardware(
        name="h100-mixtral",
        expert_bytes=_MIXTRAL_EXPERT,
        h2d_bytes_per_s=52 * _GB,  # PCIe 5 x16 from pinned memory (54.5 GB/s measured on an H200 here)
        copy_latency_s=20e-6,  # a synchronised small copy took 21 us on the H200 here
        layer_host_s=150e-6,  # CUDA-graph-free eager decode: ~15 kernel launches of ~10 us per layer
        layer_device_s=60e-6,  # attention + norms + router of one token, 4096 hidden
        expert_host_s=30e-6,
        expert_device_s=_MIXTRAL_EXPERT / (3.35e12 * 0.8),  # a GEMV streams the weights: ~80% of HBM3
        cpu_expert_s=_MIXTRAL_EXPERT / (200 * _GB),  # a 2-socket server CPU reading ~200 GB/s
        notes="H100 SXM on PCIe 5, Mixtral-8x7B bf16 experts (352 MB: 6.8 ms a copy), batch 1",
    ),
    "4090-qwen3-30b-a3b": Hardware(
        name="4090-qwen3-30b-a3b",
        expert_bytes=_QWEN3_A3B_EXPERT,
        h2d_bytes_per_s=25 * _GB,  # PCIe 4 x16 from pinned memory
        copy_latency_s=15e-6,
        layer_host_s=120e-6,
        layer_device_s=40e-6,
        expert_host_s=20e-6,
        expert_device_s=_QWEN3_A3B_EXPERT / (1.0e12 * 0.7),  # GDDR6X ~1 TB/s
        cpu_expert_s=_QWEN3_A3B_EXPERT / (60 * _GB),  # a desktop with dual-channel DDR5
        notes="RTX 4090 on PCIe 4, Qwen3-30B-A3B bf16 experts (9.4 MB: 0.39 ms a copy), batch 1",
    ),
    "4090-qwen3-30b-a3b-int4": Hardware(
        name="4090-qwen3-30b-a3b-int4",
        # moe.quant's int4: 4-bit weights plus an fp16 scale and zero point per group of 64 (4.5 bits a weight).
        expert_bytes=_QWEN3_A3B_EXPERT_INT4,
        h2d_bytes_per_s=25 * _GB,
        copy_latency_s=15e-6,
        layer_host_s=120e-6,
        layer_device_s=40e-6,
        expert_host_s=25e-6,  # one more kernel: dequantise (or a fused int4 GEMV)
        expert_device_s=_QWEN3_A3B_EXPERT_INT4 / (1.0e12 * 0.5),
        cpu_expert_s=_QWEN3_A3B_EXPERT_INT4 / (30 * _GB),  # int4 on the CPU: unpacking halves speed
        notes="the 4090 preset with int4 experts (2.65 MB: 0.12 ms a copy): copies and compute comparable",
    ),
}


def preset(name: str) -> Hardware:
    """PRESETS[name], or a ValueError listing the presets ("measured" is built by measured_hardware)."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or build one with measured_hardware()"
        )
    return PRESETS[name]


def measured_hardware(
    trace: Trace,
    *,
    resident_s_per_token: float,
    h2d_bytes_per_s: float,
    copy_latency_s: float,
    async_copies: bool,
    host_share: float = 1.0,
    copy_host_s: float = 0.0,
    predict_host_s: float = 0.0,
    cpu_expert_s: float = math.inf,
) -> Hardware:
    """The "measured" preset, calibrated from a run's own timers (benchmarks/offload_decode.py).

    Compute: a layer's own work and each expert weigh the same, split into host time (host_share)
    and device time; their scale is solved so that this trace with every expert resident takes
    resident_s_per_token (the measured resident run). Copies: the measured bandwidth, small-copy
    latency and the runtime's host timers (OffloadRuntime.host_seconds per copy and per forecast).
    """
    if not 0.0 <= host_share <= 1.0:
        raise ValueError(f"host_share must be in [0, 1], got {host_share}")
    if resident_s_per_token <= 0:
        raise ValueError(f"resident_s_per_token must be > 0, got {resident_s_per_token}")

    def build(unit: float) -> Hardware:
        return Hardware(
            name="measured",
            expert_bytes=trace.expert_bytes,
            h2d_bytes_per_s=h2d_bytes_per_s,
            copy_latency_s=copy_latency_s,
            layer_host_s=unit * host_share,
            layer_device_s=unit * (1.0 - host_share),
            expert_host_s=unit * host_share,
            expert_device_s=unit * (1.0 - host_share),
            cpu_expert_s=cpu_expert_s,
            copy_host_s=copy_host_s,
            predict_host_s=predict_host_s,
            async_copies=async_copies,
            notes="calibrated from a measured run",
        )

    # The resident time is linear in the unit (no copies), so one probe solves for it.
    probe = simulate_timeline(trace, "resident", trace.num_experts, build(1e-3)).ms_per_token / 1e3
    return build(1e-3 * resident_s_per_token / probe)


@dataclass
class TimelineResult:
    """Per-token results of one policy on one trace and machine."""

    policy: str
    ms_per_token: float
    stall_ms_per_token: float
    bytes_per_token: float
    hit_rate: float
    ready_rate: float
    prefetch_precision: float
    prefetch_recall: float
    cancelled_prefetches: int


class _Link:
    """Copy streams with a queue of prefetches that have not started (see the module docstring)."""

    def __init__(self, hw: Hardware) -> None:
        self.hw = hw
        self.free = [0.0] * hw.copy_streams
        self.queue: collections.OrderedDict[Key, float] = collections.OrderedDict()  # key -> issue time
        self.ready: dict[Key, float] = {}
        self.bytes = 0
        self.cancelled = 0

    def _start(self, key: Key, at: float) -> None:
        i = min(range(len(self.free)), key=self.free.__getitem__)
        start = max(at, self.free[i])
        self.free[i] = self.ready[key] = start + self.hw.copy_s
        self.bytes += self.hw.expert_bytes

    def drain(self, now: float) -> None:
        """Starts the queued prefetches that the link would have begun before `now`."""
        while self.queue and min(self.free) < now:
            key, issued = next(iter(self.queue.items()))
            if max(issued, min(self.free)) >= now:
                break
            del self.queue[key]
            self._start(key, issued)

    def idle(self, now: float) -> bool:
        """Nothing queued and a stream free at `now`."""
        return not self.queue and min(self.free) <= now

    def demand(self, key: Key, now: float) -> None:
        self.drain(now)
        self.queue.pop(key, None)  # a queued prefetch now needed: it goes first
        self._start(key, now)

    def prefetch(self, key: Key, now: float) -> None:
        self.queue[key] = now

    def evicted(self, key: Key) -> None:
        if self.queue.pop(key, None) is not None:
            self.cancelled += 1
        self.ready.pop(key, None)

    def ready_at(self, key: Key, now: float) -> float:
        self.drain(now)
        if key in self.queue:
            self.demand(key, now)
        return self.ready.get(key, 0.0)


def simulate_timeline(
    trace: Trace,
    policy: str,
    capacity: int,
    hw: Hardware,
    *,
    scope: str = "layer",
    lookahead: int | None = None,
    link_budget: bool = True,
    min_confidence: float = MIN_CONFIDENCE,
    layer_capacities: list[int] | None = None,
    tokens_S: torch.Tensor | None = None,
    rows_SE: torch.Tensor | None = None,
) -> TimelineResult:
    """Replays `trace` under `policy` with `capacity` experts per layer on machine `hw`.

    Args:
        trace: routing trace; one forward per pass over the layers (the step where the layer
            index does not increase starts the next token).
        policy: one of TIMELINE_POLICIES (a "_cpu" suffix: misses computed on the CPU when
            cpu_expert_s is below the copy's expected wait).
        capacity: experts per layer (scope="global": capacity * num_layers in one pool).
        hw: a Hardware (PRESETS[name], or measured_hardware(...)).
        lookahead: layers predicted ahead (predictive; default all the trace recorded).
        link_budget: start only the prefetches that fit in the link's idle time before the next
            layer's demand copies (False: every confident guess, queued behind demand copies).
        min_confidence: the least forecast router probability worth a prefetch (CacheEngine).
        layer_capacities: experts per layer instead of `capacity` for each (scope="layer"; their
            sum is the budget), e.g. split by hit curves as benchmarks/offload.py measures.
        tokens_S, rows_SE: batched steps (both or neither): the tokens of each step (int [S]) and
            the rows each expert computes there (int [S, E]); a step's layer work takes
            hw.layer_row_s more per token beyond the first, each expert hw.expert_row_s more per
            row beyond the first, and ms_per_token is the time over all tokens (a forward's tokens
            are those of its first step). None: one token a step (batch 1).
    """
    if (tokens_S is None) != (rows_SE is None):
        raise ValueError("pass tokens_S and rows_SE together (a batched trace) or neither")
    if policy not in TIMELINE_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {TIMELINE_POLICIES}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 expert per layer, got {capacity}")
    if capacity > trace.num_experts and policy != "resident":
        raise ValueError(f"capacity {capacity} exceeds the trace's {trace.num_experts} experts per layer")
    link = _Link(hw)
    base = policy.removesuffix("_cpu")
    pol: Policy = (
        Belady(trace.requests())
        if policy in ("belady", "oracle")
        else make_policy("lru" if policy == "resident" else base)
    )
    if policy == "resident":
        capacity = trace.num_experts
    budget, shares = capacity * trace.num_layers, None
    if layer_capacities is not None:
        if len(layer_capacities) != trace.num_layers or min(layer_capacities) < 1 or scope != "layer":
            raise ValueError(
                f"layer_capacities must give each of the {trace.num_layers} layers >= 1 expert "
                f"(with scope='layer'), got {layer_capacities!r} with scope={scope!r}"
            )
        if policy != "resident":
            budget, shares = sum(layer_capacities), [float(c) for c in layer_capacities]
    res = Residency(budget, pol, trace.num_layers, scope, on_evict=link.evicted, layer_shares=shares)
    clock = {"host": 0.0, "experts": 0.0}
    engine = CacheEngine(
        res,
        lambda layer: 1,
        prefetch_budget=(lambda: _prefetch_budget(link, clock["host"], hw, clock["experts"])) if link_budget else None,
        admit_cpu_misses=(lambda: link.idle(clock["host"])) if policy.endswith("_cpu") and hw.async_copies else None,
        min_confidence=min_confidence,
    )
    if policy == "resident":  # every expert already on the device
        for layer in range(trace.num_layers):
            for e in range(trace.num_experts):
                res.insert((layer, e), 1)
    host = device = 0.0

    def fetch(key: Key, prefetch: bool) -> None:
        clock["host"] += hw.copy_host_s
        if not hw.async_copies:  # the host thread copies, prefetch or not
            clock["host"] += hw.copy_s
            link.ready[key] = clock["host"]
            link.bytes += hw.expert_bytes
        elif prefetch:
            link.prefetch(key, clock["host"])
        else:
            link.demand(key, clock["host"])

    engine.fetch = fetch

    def on_cpu(key: Key) -> bool:
        wait = max(min(link.free) - clock["host"], 0.0) + hw.copy_s
        return hw.cpu_expert_s < wait

    depth = trace.lookahead if lookahead is None else min(lookahead, trace.lookahead)
    tokens, previous_layer = 0, trace.num_layers
    for s in range(trace.num_steps):
        layer = int(trace.layer_S[s])
        if layer <= previous_layer:  # a new forward: the last one ended with a host sync
            host = max(host, device)
            tokens += 1 if tokens_S is None else int(tokens_S[s])
        previous_layer = layer
        launch = host
        host += hw.layer_host_s
        extra = 0.0 if tokens_S is None else (int(tokens_S[s]) - 1) * hw.layer_row_s
        device = max(device, launch) + hw.layer_device_s + extra
        host = max(host, device)  # the router's choice is read on the host
        if base in _PREFETCHING:
            host += hw.predict_host_s
        clock["host"] = host
        clock["experts"] = float(len(trace.needed(s)))
        ahead = []
        if base in _PREFETCHING and trace.ahead_SAE is not None:
            ahead = [(layer + j + 1, trace.ahead_SAE[s, j]) for j in range(depth) if layer + j + 1 < trace.num_layers]
        probs = trace.probs_SE[s] if trace.probs_SE is not None else None
        steps = engine.step(layer, trace.needed(s), probs, ahead, on_cpu if policy.endswith("_cpu") else None)
        for e, where in steps:
            if where == "cpu":
                clock["host"] += hw.cpu_expert_s
                device = max(device, clock["host"])  # its output goes back into the device's stream
                continue
            ready = link.ready_at((layer, e), clock["host"]) if hw.async_copies else 0.0
            launch = clock["host"]
            clock["host"] += hw.expert_host_s
            extra = 0.0 if rows_SE is None else max(int(rows_SE[s, e]) - 1, 0) * hw.expert_row_s
            device = max(device, launch, ready) + hw.expert_device_s + extra
        host = clock["host"]
        if policy == "oracle" and s + 1 < trace.num_steps:
            _oracle_prefetch(trace, s + 1, engine)
            host = clock["host"]  # copies without async_copies ran on the host
    host = max(host, device)
    stats = res.stats
    tokens = max(tokens, 1)
    prefetches = stats.prefetches
    misses = stats.copies + stats.cpu_misses + stats.prefetch_hits
    return TimelineResult(
        policy=policy,
        ms_per_token=1e3 * host / tokens,
        stall_ms_per_token=math.nan,  # filled by compare() against the resident run
        bytes_per_token=link.bytes / tokens,
        hit_rate=stats.hit_rate if policy != "resident" else 1.0,
        ready_rate=stats.ready_rate if policy != "resident" else 1.0,
        prefetch_precision=stats.prefetch_hits / prefetches if prefetches else math.nan,
        prefetch_recall=stats.prefetch_hits / misses if misses else math.nan,
        cancelled_prefetches=link.cancelled,
    )


def _prefetch_budget(link: _Link, now: float, hw: Hardware, experts: float) -> int:
    """Prefetch copies that fit in the link's idle time before the next layer's demand copies:
    this layer's experts and the next layer's own work (its routing is not known before), minus
    the copies already queued or running. A copy still running then would delay a needed expert."""
    window = hw.layer_host_s + hw.layer_device_s + experts * (hw.expert_host_s + hw.expert_device_s)
    backlog = max(min(link.free) - now, 0.0) + len(link.queue) * hw.copy_s
    return link_budget(window, backlog, hw.copy_s, hw.copy_streams) if hw.async_copies else 0


def _oracle_prefetch(trace: Trace, s: int, engine: CacheEngine) -> None:
    """Prefetches step s's experts, evicting only residents Belady would drop first."""
    policy = engine.residency.policy
    assert isinstance(policy, Belady)
    layer = int(trace.layer_S[s])
    for e in trace.needed(s):
        engine.start_prefetch((layer, e), floor=policy.rank((layer, e)))  # residents needed later only


def compare(
    trace: Trace, capacity: int, hw: Hardware, policies: tuple[str, ...] = TIMELINE_POLICIES, **options: object
) -> list[TimelineResult]:
    """simulate_timeline for each policy, with stall ms/token against the all-resident run."""
    resident = simulate_timeline(trace, "resident", capacity, hw)
    out = []
    for name in policies:
        r = resident if name == "resident" else simulate_timeline(trace, name, capacity, hw, **options)  # type: ignore[arg-type]
        out.append(dataclasses.replace(r, stall_ms_per_token=r.ms_per_token - resident.ms_per_token))
    return out
