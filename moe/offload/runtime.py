"""OffloadedExperts: a drop-in for moe.experts.Experts whose weights live in an ExpertStore.

    layer.experts = OffloadedExperts(runtime, layer_ordinal, E, D, H)   # MoE.forward unchanged

The shared OffloadRuntime owns the store, the device-tier Residency (budgets + policy), the
copy-or-compute cost model, the lookahead routers and the routing trace of the run.

Shape legend: N routed rows sorted by expert, D dim, H expert hidden, F = 2H, E experts.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moe import quant
from moe.config import positional_deprecated
from moe.experts import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, ExpertsBase, expert_mlp
from moe.offload.cache import Residency
from moe.offload.cost import CostModel
from moe.offload.engine import MIN_CONFIDENCE, CacheEngine, link_budget
from moe.offload.policies import Key, make_policy
from moe.offload.predict import forecast
from moe.offload.store import ExpertStore
from moe.offload.trace import Trace, TraceBuilder
from moe.quant import QuantizedWeight, quantized_mlp_one

__all__ = ["OffloadConfig", "OffloadRuntime", "OffloadedExperts"]

MISS_MODES = ("auto", "copy", "cpu")


Policy = Literal["lru", "lfu", "predictive"]
Scope = Literal["layer", "global"]
Miss = Literal["auto", "copy", "cpu"]
ExpertQuant = Literal["int8", "int4"]
CACHE_POLICIES = ("lru", "lfu", "predictive")  # belady is offline: moe.offload.simulate only
SCOPES = ("layer", "global")


@positional_deprecated
@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How experts are cached (`moe.offload.load(dir, device, config=OffloadConfig(...))`).

    Attributes:
        expert_cache_bytes: device bytes for experts (per-layer scope: split over MoE layers in
            proportion to their expert count x expert size: evenly when all layers are alike).
        policy: "lru" | "lfu" | "predictive".
        scope: "layer" (per-layer budgets) or "global" (one pool across layers).
        lookahead: layers ahead the predictive policy prefetches (0 = eviction ranking only).
        miss: "copy" (always copy a miss), "cpu" (compute every miss where it lives), or "auto"
            (cost model per miss; on a CPU device the device is the CPU, so "auto" copies).
        ram_cache_bytes: RAM tier budget (None = unlimited, 0 = stream from disk).
        record_trace: keep the routing of every step (for Belady and replays; ~4 KB per layer step
            at E = 256, so off by default: a long serving run would grow without bound).
        link_budget: on CUDA, the predictive policy starts only the prefetches that the measured
            host -> device link can finish within one layer's measured time, minus the copies
            already in flight (moe.offload.engine.link_budget); False: every confident guess.
        min_confidence: the least router probability a forecast must give an expert for the
            predictive policy to prefetch it (moe.offload.engine.MIN_CONFIDENCE).
        expert_quant: None (experts at the compute dtype), "int8" (per output channel) or "int4"
            (group-wise with zero points): load() quantizes every expert (moe.quant) and every tier
            holds, counts and moves only the quantized bytes; each expert is dequantized on the
            device at use (moe.offload.quantized).
        expert_quant_group_size: int4's group size G along the inner dimension (32, 64 or 128;
            it must divide the model dim and the expert hidden size).
        expert_quant_dir: a directory for an on-disk cache of the quantized experts (one
            safetensors file per MoE layer): written once by load() where missing, so the
            experts are quantized once; read (and checked) where present. None: no disk cache,
            each expert is quantized as it is read from the checkpoint.
        miss_quant: mixed precision in the HOBBIT spirit: None (off), or "int8" | "int4": a miss
            runs at once from a low-precision copy of the expert (quantized from the RAM tier on
            its first miss and then kept on the device: at most every expert at that precision),
            while the full copy is fetched as a prefetch for later uses. Those misses count as
            CacheStats.cpu_misses (computed elsewhere than the cache); requires expert_quant None
            and a miss mode other than "cpu".
    """

    expert_cache_bytes: int
    policy: Policy = "lru"
    scope: Scope = "layer"
    lookahead: int = 1
    miss: Miss = "auto"
    ram_cache_bytes: int | None = None
    record_trace: bool = False
    link_budget: bool = True
    min_confidence: float = MIN_CONFIDENCE
    expert_quant: ExpertQuant | None = None
    expert_quant_group_size: int = 64
    expert_quant_dir: str | None = None
    miss_quant: ExpertQuant | None = None

    def __post_init__(self) -> None:
        from moe.offload.quantized import check_expert_quant

        check_expert_quant(self.expert_quant, self.expert_quant_group_size)
        check_expert_quant(self.miss_quant, self.expert_quant_group_size)
        if self.miss_quant is not None and (self.expert_quant is not None or self.miss == "cpu"):
            raise ValueError(
                f"miss_quant={self.miss_quant!r} runs misses from a low-precision copy of full-precision experts: "
                f"it needs expert_quant=None (got {self.expert_quant!r}) and miss 'auto' or 'copy' (got {self.miss!r})"
            )
        if self.expert_quant_dir is not None and self.expert_quant is None:
            raise ValueError("expert_quant_dir is a cache of quantized experts: set expert_quant too")
        if self.policy not in CACHE_POLICIES:
            raise ValueError(
                f"unknown policy {self.policy!r}; policy must be one of {CACHE_POLICIES} "
                "(belady is offline: moe.offload.simulate)"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.miss not in MISS_MODES:
            raise ValueError(f"miss must be one of {MISS_MODES}, got {self.miss!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int):
            raise TypeError(f"lookahead must be an int, got {self.lookahead!r}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be a router probability in [0, 1], got {self.min_confidence}")
        if not self.expert_cache_bytes >= 0:
            raise ValueError(f"expert_cache_bytes must be >= 0, got {self.expert_cache_bytes}")
        if self.ram_cache_bytes is not None and not self.ram_cache_bytes >= 0:
            raise ValueError(f"ram_cache_bytes must be None (unlimited) or >= 0, got {self.ram_cache_bytes}")


class OffloadRuntime:
    """Shared state of all OffloadedExperts of one model.

    Args:
        store: the tiered expert store.
        config: OffloadConfig.
        routers: router module of each MoE layer, in order (lookahead prefetch and predictive scores).
        num_experts: E of each MoE layer.
        activation: expert activation ("swiglu", "swiglu_oai" or "gelu").
        cost: measured speeds for miss="auto" on an accelerator (None: measured on first need).

    Raises:
        BudgetError: the budget cannot hold one expert (per layer with scope="layer").
    """

    def __init__(
        self,
        store: ExpertStore,
        config: OffloadConfig,
        routers: list[nn.Module],
        num_experts: list[int],
        activation: str = "swiglu",
        cost: CostModel | None = None,
        *,
        swiglu_alpha: float = SWIGLU_OAI_ALPHA,
        swiglu_limit: float = SWIGLU_OAI_LIMIT,
    ) -> None:
        self.store, self.config, self.routers, self.num_experts = store, config, routers, num_experts
        self.activation, self.cost = activation, cost
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit  # of activation="swiglu_oai" (GPT-OSS)
        self.num_layers = len(routers)
        if len(num_experts) != self.num_layers:
            raise ValueError(f"num_experts has {len(num_experts)} entries for {self.num_layers} MoE layers (routers)")
        # Per-layer pools in proportion to each layer's expert bytes: a pyramid's wide layers get more.
        shares = [float(n * store.expert_bytes(layer)) for layer, n in enumerate(num_experts)]
        self.residency = Residency(
            config.expert_cache_bytes,
            make_policy(config.policy),
            self.num_layers,
            config.scope,
            store.drop,
            layer_shares=None if len(set(shares)) <= 1 else shares,
        )
        for layer in range(self.num_layers):
            self.residency.check_fits(store.expert_bytes(layer), f"one expert of MoE layer {layer}", (layer, 0))
        if config.miss_quant is not None:  # the low-precision copies' group size must fit every layer
            from moe.offload.quantized import QuantizedExpertShape

            for shape in store.shapes.values():
                QuantizedExpertShape(
                    shape.dim, shape.hidden, shape.width, scheme=config.miss_quant,
                    group_size=config.expert_quant_group_size,
                )  # fmt: skip
        cuda_link = store.device.type == "cuda" and config.link_budget
        self.engine = CacheEngine(
            self.residency,
            store.expert_bytes,
            fetch=self._fetch,
            prefetch_budget=self._prefetch_budget if cuda_link else None,
            min_confidence=config.min_confidence,
            # mixed precision: after a miss ran from its low-precision copy, fetch the full copy
            admit_cpu_misses=(lambda: True) if config.miss_quant is not None else None,
        )
        # miss_quant: low-precision copies on the device, by expert, and the bytes they took
        self.low_copies: dict[Key, tuple[QuantizedWeight, QuantizedWeight]] = {}
        self.low_copy_bytes = 0
        self.layer_seconds = 0.0  # moving average of the time between two layers' expert calls
        self._last_layer_start: float | None = None
        self.predicts = self.residency.policy.prefetches
        self.trace = TraceBuilder(self.num_layers, max(num_experts), config.lookahead if self.predicts else 0)
        self.cpu_rows = 0
        # Host seconds spent issuing copies and forecasting, and how many of each: the timeline's
        # "measured" preset (moe.offload.timeline.measured_hardware) is calibrated from them.
        self.host_seconds = {"fetch": 0.0, "forecast": 0.0}
        self.host_calls = {"fetch": 0, "forecast": 0}
        # How quantized experts were multiplied, by device type (moe.quant.matmul_path); filled on use.
        self.quant_paths: dict[str, str] = {}

    @property
    def stats(self):  # noqa: ANN201 - CacheStats
        """The CacheStats of the device tier (hits, copies, prefetches, CPU misses, bytes moved)."""
        return self.residency.stats

    def _fetch(self, key: Key, prefetch: bool) -> None:
        start = time.perf_counter()
        self.store.fetch(key, prefetch)
        self._timed("fetch", start)

    def _timed(self, what: str, start: float) -> None:
        self.host_seconds[what] += time.perf_counter() - start
        self.host_calls[what] += 1

    def _on_cpu(self, rows_E: list[int], device: torch.device, act_bytes: int) -> object:
        mode = self.config.miss
        if mode == "cpu" or self.config.miss_quant is not None:
            return lambda key: True
        if mode == "copy" or device.type == "cpu":
            return lambda key: False
        if self.cost is None:
            from moe.offload.cost import measure

            self.cost = measure(device)
        cost = self.cost

        def decide(key: Key) -> bool:
            shape = self.store.shapes[key[0]]
            flops = 2 * (shape.dim * shape.width + shape.hidden * shape.dim)
            return cost.compute_on_cpu(self.store.expert_bytes(key[0]), rows_E[key[1]], flops, shape.dim * act_bytes)

        return decide

    def _predict(self, layer: int, x_TD: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        if not self.predicts or x_TD.shape[0] == 0:
            return None, []
        start = time.perf_counter()
        probs, _, ahead = forecast(self.routers, layer, x_TD, self.config.lookahead)
        self._timed("forecast", start)
        return probs, ahead

    @torch.no_grad()
    def _prefetch_budget(self) -> int:
        """Prefetches the link can finish before the next layer needs it (CUDA; engine.link_budget)."""
        if self.layer_seconds <= 0.0:
            return 1  # nothing measured yet
        if self.cost is None:
            from moe.offload.cost import measure

            self.cost = measure(self.store.device)
        copy_s = self.store.expert_bytes(0) / self.cost.h2d_bytes_per_s
        return link_budget(self.layer_seconds, self.store.in_flight() * copy_s, copy_s)

    def _tick(self) -> None:
        """Updates layer_seconds; gaps over a second (between generate calls) are not layer time."""
        now = time.perf_counter()
        if self._last_layer_start is not None and now - self._last_layer_start < 1.0:
            dt = now - self._last_layer_start
            self.layer_seconds = dt if self.layer_seconds == 0.0 else 0.9 * self.layer_seconds + 0.1 * dt
        self._last_layer_start = now

    def run_layer(
        self,
        layer: int,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        b_in_EF: torch.Tensor | None = None,
        b_out_ED: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Experts of `layer` on rows sorted by expert; same contract as Experts.forward.

        b_in_EF, b_out_ED: the layer's expert biases (GPT-OSS), resident on the device, or None."""
        self._tick()
        counts = [int(c) for c in counts_E.tolist()]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        y_ND = x_ND.new_zeros(x_ND.shape)
        needed = [e for e, c in enumerate(counts) if c > 0]
        probs, ahead = self._predict(layer, x_ND[: starts[-1]])
        if self.config.record_trace:
            self.trace.add(layer, needed, probs, ahead)
        on_cpu = self._on_cpu(counts, x_ND.device, x_ND.element_size())
        for e, where in self.engine.step(layer, needed, probs, ahead, on_cpu):  # type: ignore[arg-type]
            rows = slice(starts[e], starts[e + 1])
            if where == "device":
                try:
                    w_in, w_out = self.store.ready((layer, e))
                except BaseException:  # its read failed: drop it, so the next request reads it again
                    if (layer, e) in self.residency:
                        self.residency.evict((layer, e))
                    raise
                y_ND[rows] = self._mlp(x_ND[rows], w_in, w_out, _row(b_in_EF, e), _row(b_out_ED, e))
            elif self.config.miss_quant is not None:
                q_in, q_out = self._low_copy((layer, e), x_ND.device)
                y_ND[rows] = self._mlp(x_ND[rows], q_in, q_out)
            else:
                w_in, w_out = self.store.shapes[layer].views(self.store.host((layer, e)))
                self.cpu_rows += counts[e]
                b_in, b_out = _row(b_in_EF, e, "cpu"), _row(b_out_ED, e, "cpu")
                y_ND[rows] = self._mlp(x_ND[rows].cpu(), w_in, w_out, b_in, b_out).to(x_ND.device)
        return y_ND

    def _low_copy(self, key: Key, device: torch.device) -> tuple[QuantizedWeight, QuantizedWeight]:
        """key's low-precision copy on `device` (miss_quant), quantized from the RAM tier on first use."""
        copy = self.low_copies.get(key)
        if copy is None:
            scheme, group = self.config.miss_quant, self.config.expert_quant_group_size
            assert scheme is not None
            w_in, w_out = self.store.shapes[key[0]].views(self.store.host(key))
            q_in, q_out = (quant.quantize(w.unsqueeze(0), scheme, group).to(device) for w in (w_in, w_out))
            copy = self.low_copies[key] = (q_in, q_out)
            self.low_copy_bytes += q_in.nbytes + q_out.nbytes
        return copy

    def _mlp(
        self,
        x_ND: torch.Tensor,
        w_in_DF: torch.Tensor | QuantizedWeight,
        w_out_HD: torch.Tensor | QuantizedWeight,
        b_in_F: torch.Tensor | None = None,
        b_out_D: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(w_in_DF, QuantizedWeight) and isinstance(w_out_HD, QuantizedWeight):
            # load() refuses quantized experts with biases or GPT-OSS's clamped SwiGLU: none here.
            self._note_quant_path(x_ND.device)
            return quantized_mlp_one(x_ND, w_in_DF, w_out_HD, self.activation)
        assert isinstance(w_in_DF, torch.Tensor) and isinstance(w_out_HD, torch.Tensor)
        return expert_mlp(
            x_ND,
            w_in_DF,
            w_out_HD,
            None,
            self.activation,
            b_in=b_in_F,
            b_out=b_out_D,
            alpha=self.swiglu_alpha,
            limit=self.swiglu_limit,
        )

    def _note_quant_path(self, device: torch.device) -> None:
        """Records (and, for the fallback, warns once per device type) how quantized experts run."""
        if device.type in self.quant_paths:
            return
        path = self.quant_paths[device.type] = quant.matmul_path(device)
        if path == "dequantize-then-matmul":
            warnings.warn(
                f"quantized experts on {device.type}: no fused dequantize-GEMM here, each expert is "
                "dequantized whole and multiplied in the compute dtype (weights still move and stay quantized)",
                stacklevel=2,
            )

    def recorded_trace(self) -> Trace:
        """The routing of every step so far, as a Trace (replay it with moe.offload.simulate).

        Raises:
            ValueError: the runtime was built with record_trace=False (the default).
        """
        if not self.config.record_trace:
            raise ValueError("no trace recorded: load with record_trace=True (moe.offload.load / OffloadConfig)")
        return self.trace.build(expert_bytes=self.store.expert_bytes(0))

    def close(self) -> None:
        """Stops the store's reader thread."""
        self.store.close()


def _row(bias_EX: torch.Tensor | None, e: int, device: str | None = None) -> torch.Tensor | None:
    """Expert e's bias row (on `device` if given), or None without biases."""
    if bias_EX is None:
        return None
    return bias_EX[e] if device is None else bias_EX[e].to(device)


class OffloadedExperts(ExpertsBase):
    """Experts whose weights stay in the runtime's store; forward(x_sorted, counts) -> y_sorted.

    No fused path (supports_fused is False: the weights are not resident as [E, ...] tensors),
    so the dispatcher gathers rows for them on every device.

    `w_in` / `w_out` are zero-stride stand-ins with the right shape, dtype and device (MoE checks
    the input against them); the real weights are only ever in the store's tiers.

    b_in [E, F] / b_out [E, D] (GPT-OSS's expert biases), if given, stay resident on the device like
    the routers: they are E * (F + D) elements a layer, about 1 / D of the experts' bytes, so
    streaming them through the store would cost a transfer each for nothing.
    """

    def __init__(
        self,
        runtime: OffloadRuntime,
        layer: int,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.runtime, self.layer = runtime, layer
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.width = 2 * hidden_dim if runtime.activation in ("swiglu", "swiglu_oai") else hidden_dim
        self.register_buffer("anchor", torch.zeros(1, 1, 1, dtype=dtype, device=device), persistent=False)
        if (b_in is None) != (b_out is None):
            raise ValueError("OffloadedExperts: give both b_in and b_out, or neither")
        if b_in is not None and b_out is not None:
            want = ((num_experts, self.width), (num_experts, dim))
            if (tuple(b_in.shape), tuple(b_out.shape)) != want:
                raise ValueError(
                    f"OffloadedExperts: biases are {tuple(b_in.shape)} and {tuple(b_out.shape)}, expected {want}"
                )
        self.register_buffer("b_in", b_in, persistent=False)
        self.register_buffer("b_out", b_out, persistent=False)

    anchor: torch.Tensor
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None

    @property
    def w_in(self) -> torch.Tensor:
        """A zero-stride stand-in [E, D, F] with the real weights' shape, dtype and device."""
        return self.anchor.expand(self.num_experts, self.dim, self.width)

    @property
    def w_out(self) -> torch.Tensor:
        """A zero-stride stand-in [E, H, D] with the real weights' shape, dtype and device."""
        return self.anchor.expand(self.num_experts, self.hidden_dim, self.dim)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """y_sorted [N, D] for rows x_sorted [N, D] sorted by expert, counts [E]: runs the layer through the cache."""
        return self.runtime.run_layer(self.layer, x_ND, counts_E, self.b_in, self.b_out)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}"
