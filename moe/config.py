"""Frozen, validated configuration dataclasses.

Shape legend used across the package:
    T = tokens, D = model dim, H = expert hidden dim, E = experts, K = top-k,
    N = dispatched token copies (<= T * K), F = first-GEMM width (2H for SwiGLU, H for GELU).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from moe.parallel.planner import Plan

__all__ = [
    "Activation",
    "Backend",
    "ScoreFunc",
    "GroupScore",
    "ACTIVATIONS",
    "BACKENDS",
    "check_int",
    "check_unit",
    "positional_deprecated",
    "TopKConfig",
    "AuxFreeConfig",
    "RecurrentConfig",
    "ExpertChoiceConfig",
    "PlannerConfig",
    "ParallelConfig",
    "RouterConfig",
    "ROUTER_CONFIGS",
    "router_config",
    "MoEConfig",
]


Activation = Literal["swiglu", "gelu", "swiglu_oai"]
Backend = Literal["auto", "reference", "cpp", "triton", "torch"]
ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2_sum", "max"]
RoutingDtype = Literal["float32", "model"]

ACTIVATIONS = ("swiglu", "gelu", "swiglu_oai")
BACKENDS = ("auto", "reference", "cpp", "triton", "torch")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_int(name: str, value: object, low: int) -> None:
    """Raises TypeError unless `value` is an int (not a bool), ValueError unless it is >= `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_unit(name: str, value: float) -> None:
    """Raises ValueError unless 0 <= `value` <= 1 (NaN is rejected)."""
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_finite_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


_C = TypeVar("_C", bound=type)


def positional_deprecated(cls: _C) -> _C:
    """Lets a kw_only config dataclass still take its fields positionally, with a DeprecationWarning
    (these configs took positional arguments before they became keyword-only)."""
    init: Callable[..., None] = cls.__init__  # type: ignore[misc]
    names = [f.name for f in fields(cls)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__} takes at most {len(names)} fields, got {len(args)} positional")
            given = names[: len(args)]
            warnings.warn(
                f"positional arguments to {cls.__name__} are deprecated; pass them as keywords "
                f"({', '.join(f'{n}=...' for n in given)})",
                DeprecationWarning,
                stacklevel=2,
            )
            for name, value in zip(given, args, strict=True):
                if name in kwargs:
                    raise TypeError(f"{cls.__name__} got multiple values for field {name!r}")
                kwargs[name] = value
        init(self, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@dataclass(frozen=True, kw_only=True)
class TopKConfig:
    """Top-k softmax router (Switch / GShard / Mixtral).

    Attributes:
        norm_topk_prob: renormalise the k selected probabilities to sum to 1 (Mixtral: always;
            Qwen2/3-MoE and OLMoE: a config flag).
        aux_loss_coef: weight of the Switch/GShard balance loss alpha * E * sum_i f_i P_i.
        z_loss_coef: weight of the ST-MoE router z-loss mean(logsumexp(logits)^2).
        jitter: multiplicative input noise U(1 - jitter, 1 + jitter) in training (Switch).
        routing_dtype: "float32" (default): logits from fp32 copies of x and W. "model": logits
            x W^T (+ b) in x's dtype, as Hugging Face's Mixtral / Qwen / OLMoE / Granite / GPT-OSS
            routers compute them; softmax, top-k and renormalisation then run in fp32 on those
            logits. Same as "float32" for fp32 inputs.
        round_weights: with routing_dtype="model", round the gate weights to x's dtype (they
            stay fp32 tensors holding those values): HF's Qwen / OLMoE / Jamba / Granite / GPT-OSS
            routers return them in the model dtype, Mixtral's and MiniMax's in fp32.
        softmax_after_topk: weights = softmax over the k largest logits (Granite-MoE, GPT-OSS)
            instead of the top-k of the softmax over all experts; the same up to rounding as
            renormalised top-k probabilities, so it requires norm_topk_prob=True.
        bias: logits = x W^T + b with a learned bias b [E] (GPT-OSS); the router's `bias`.
    """

    norm_topk_prob: bool = True
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    jitter: float = 0.0
    routing_dtype: RoutingDtype = "float32"
    round_weights: bool = False
    softmax_after_topk: bool = False
    bias: bool = False

    def __post_init__(self) -> None:
        _check_non_negative("aux_loss_coef", self.aux_loss_coef)
        _check_non_negative("z_loss_coef", self.z_loss_coef)
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        _check_choice("routing_dtype", self.routing_dtype, ("float32", "model"))
        if self.softmax_after_topk and not self.norm_topk_prob:
            raise ValueError("softmax_after_topk=True gives normalised weights; it requires norm_topk_prob=True")


@dataclass(frozen=True, kw_only=True)
class AuxFreeConfig:
    """DeepSeek-V3 auxiliary-loss-free router.

    Attributes:
        score_func: "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2 style scores).
        n_group: expert groups for group-limited routing (1 = no group limit).
        topk_group: groups kept per token; must be <= n_group.
        group_score: how a group is scored: "top2_sum" (DeepSeek-V3: sum of its top-2 scores)
            or "max" (DeepSeek-V2's group_limited_greedy: its best expert).
        routed_scaling_factor: multiplies the gate weights (2.5 in the 671B config).
        norm_topk_prob: renormalise the selected (unbiased) scores before scaling.
        bias_update_rate: gamma in b_i += gamma * sign(mean_load - load_i).
        seq_aux_loss_coef: alpha of the optional sequence-wise balance loss (1e-4 in the paper).
        routing_dtype: "float32" (default): logits from fp32 copies of x and W. "model": logits in
            x's dtype (as Hugging Face's MiniMax-M2 computes them), scores and selection in fp32.
    """

    score_func: ScoreFunc = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_update_rate: float = 1e-3
    seq_aux_loss_coef: float = 0.0
    routing_dtype: RoutingDtype = "float32"

    def __post_init__(self) -> None:
        _check_choice("score_func", self.score_func, ("softmax", "sigmoid"))
        _check_choice("routing_dtype", self.routing_dtype, ("float32", "model"))
        _check_positive_int("n_group", self.n_group)
        _check_positive_int("topk_group", self.topk_group)
        _check_choice("group_score", self.group_score, ("top2_sum", "max"))
        if self.topk_group > self.n_group:
            raise ValueError(
                f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group}): "
                "a token cannot keep more groups than exist"
            )
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        _check_non_negative("bias_update_rate", self.bias_update_rate)
        _check_non_negative("seq_aux_loss_coef", self.seq_aux_loss_coef)


@dataclass(frozen=True, kw_only=True)
class RecurrentConfig:
    """Layerwise recurrent router (RMoE): W1_i -> shared GRUCell -> W2_i -> softmax top-k.

    Attributes:
        recurrent_dim: d_r, input and hidden size of the GRU cell shared by all layers.
        norm_topk_prob, aux_loss_coef, z_loss_coef: as in TopKConfig.
    """

    recurrent_dim: int = 256
    norm_topk_prob: bool = True
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_positive_int("recurrent_dim", self.recurrent_dim)
        _check_non_negative("aux_loss_coef", self.aux_loss_coef)
        _check_non_negative("z_loss_coef", self.z_loss_coef)


@dataclass(frozen=True, kw_only=True)
class ExpertChoiceConfig:
    """Expert-choice router: each expert takes its top C = ceil(T * c / E) tokens.

    Not causal: a token's routing depends on later tokens of the batch, so it leaks future
    tokens in autoregressive language models. Use it for encoders or non-causal training only.

    Attributes:
        capacity_factor: c, the average number of experts per token (2 in the paper).
    """

    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")


@positional_deprecated
@dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    """Knobs of the adaptive expert-parallel planner (see moe.parallel.planner).

    Attributes:
        chunk_options: candidate pipeline degrees d (each >= 1).
        warmup: untimed runs of each candidate before it is measured.
        samples: timed runs of each candidate per exploration.
        check_every: steps between re-measurements of the picked plan.
        recheck_every: steps between full re-explorations.
        shift_threshold: relative change of the token distribution that triggers a re-exploration.
        max_samples: timing samples kept per candidate.
        runoff_margin: candidates within this relative margin of the best are measured again
            before the pick (0 = no run-off).
    """

    chunk_options: tuple[int, ...] = (1, 2, 4)
    warmup: int = 1
    samples: int = 3
    check_every: int = 10
    recheck_every: int = 500
    shift_threshold: float = 0.5
    max_samples: int = 16
    runoff_margin: float = 0.1

    def __post_init__(self) -> None:
        options = self.chunk_options
        if isinstance(options, list):  # a list reads naturally; keep the config hashable
            object.__setattr__(self, "chunk_options", options := tuple(options))
        if (
            not isinstance(options, tuple)
            or not options
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in options)
        ):
            raise ValueError(
                f"chunk_options must be a non-empty tuple of positive pipeline degrees, e.g. (1, 2, 4); got {options!r}"
            )
        check_int("warmup", self.warmup, 0)
        check_int("samples", self.samples, 1)
        check_int("check_every", self.check_every, 1)
        check_int("recheck_every", self.recheck_every, 1)
        check_int("max_samples", self.max_samples, 1)
        _check_non_negative("shift_threshold", self.shift_threshold)
        if not self.runoff_margin >= 0:
            raise ValueError(f"runoff_margin must be >= 0 (0 = no run-off), got {self.runoff_margin}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How an MoE layer runs expert-parallel (`MoE.from_config(cfg, process_group=group)`).

    The process group itself is not part of the config (it is a live object, not a setting):
    it is given when the layer is built.

    Attributes:
        plan: None (the adaptive planner picks mode and pipeline degree per call) or a pinned
            plan: a moe.parallel.Plan or a string such as "ep", "dp", "ep+shard2/d=4".
        planner: the adaptive planner's knobs (None = PlannerConfig() defaults).
        local_size: ranks per node for the hierarchical all-to-all (None = flat).
    """

    plan: str | Plan | None = None
    planner: PlannerConfig | None = None
    local_size: int | None = None

    def __post_init__(self) -> None:
        if self.plan is not None:
            from moe.parallel.planner import Plan  # torch.distributed only when a plan is given

            if isinstance(self.plan, str):
                try:
                    Plan.parse(self.plan)
                except ValueError as err:
                    raise ValueError(f"plan: {err}") from None
            elif not isinstance(self.plan, Plan):
                raise TypeError(
                    f"plan must be None, a moe.parallel.Plan or a string like 'ep/d=2', got {type(self.plan).__name__}"
                )
        if self.planner is not None and not isinstance(self.planner, PlannerConfig):
            raise TypeError(f"planner must be a PlannerConfig, got {type(self.planner).__name__}")
        if self.local_size is not None:
            _check_positive_int("local_size", self.local_size)


RouterConfig = TopKConfig | AuxFreeConfig | RecurrentConfig | ExpertChoiceConfig

ROUTER_CONFIGS: dict[str, type] = {
    "topk": TopKConfig,
    "aux_free": AuxFreeConfig,
    "recurrent": RecurrentConfig,
    "expert_choice": ExpertChoiceConfig,
}


def router_config(name: str, **options: object) -> RouterConfig:
    """Builds the config of router `name` from keyword options, naming unknown ones."""
    if name not in ROUTER_CONFIGS:
        raise ValueError(f"router must be one of {tuple(ROUTER_CONFIGS)} or a Router module, got {name!r}")
    cls = ROUTER_CONFIGS[name]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for router {name!r}; it accepts {sorted(allowed)}")
    return cls(**options)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Configuration of one MoE layer (`moe.MoE.from_config`).

    Attributes:
        dim: D, model dimension (input and output width).
        hidden_dim: H, hidden width of each routed expert.
        num_experts: E, routed experts.
        top_k: K, experts per token (for expert choice: ignored by routing, still validated).
        router: router name; its options go in `router_config`.
        router_config: the router's config dataclass; None = that router's defaults.
        activation: "swiglu" (silu(x W_gate) * x W_up), "gelu", or "swiglu_oai" (GPT-OSS:
            (clamp(x W_up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(x W_gate, l)).
        expert_bias: routed experts have biases b_in [E, F], b_out [E, D] (GPT-OSS).
        swiglu_alpha, swiglu_limit: alpha and l of "swiglu_oai" (GPT-OSS: 1.702, 7.0).
        num_shared_experts: always-on experts (DeepSeekMoE), merged into one MLP of width
            num_shared_experts * hidden_dim unless shared_expert_hidden_dim is given.
        shared_expert_hidden_dim: explicit width of the shared MLP (Qwen2-MoE style).
        shared_expert_gate: scale the shared output by sigmoid(x w_g) (Qwen2-MoE).
        capacity_factor: None or 0 = dropless; > 0: each expert keeps at most
            ceil(capacity_factor * T * K / E) token copies (see MoE for the drop priority).
        backend: op backend ("auto" picks the fastest correct one per device).
        parallel: None (single process) or how to run expert-parallel; the layer is then built
            with `MoE.from_config(cfg, process_group=group)`.
        residual: Residual MoE (DeepSpeed-MoE, Rajbhandari et al. 2022): a dense MLP branch runs
            on every token beside the MoE block and the two are mixed per token by a learned
            two-way coefficient, as deepspeed.moe.layer.MoE(use_residual=True) computes it:
            c = softmax(Linear(D, 2)(x)), y = moe(x) * c[..., 0:1] + mlp(x) * c[..., 1:], where
            moe(x) is the routed experts plus any shared experts. The dense branch and the
            coefficient are ordinary (replicated) parameters, also under expert parallelism.
        residual_hidden_dim: width of the dense branch's MLP (None = hidden_dim, as DeepSpeed,
            whose dense branch is a copy of the expert module); needs residual=True.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    router: str = "topk"
    router_config: RouterConfig | None = None
    activation: Activation = "swiglu"
    num_shared_experts: int = 0
    shared_expert_hidden_dim: int | None = None
    shared_expert_gate: bool = False
    capacity_factor: float | None = None
    backend: Backend = "auto"
    parallel: ParallelConfig | None = None
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    residual: bool = False
    residual_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int("dim", self.dim)
        _check_positive_int("hidden_dim", self.hidden_dim)
        _check_positive_int("num_experts", self.num_experts)
        _check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts}); lower top_k or add experts"
            )
        _check_choice("router", self.router, tuple(ROUTER_CONFIGS))
        if self.router_config is not None and not isinstance(self.router_config, ROUTER_CONFIGS[self.router]):
            raise TypeError(
                f"router_config for router {self.router!r} must be a "
                f"{ROUTER_CONFIGS[self.router].__name__}, got {type(self.router_config).__name__}"
            )
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_finite_positive("swiglu_alpha", self.swiglu_alpha)
        _check_finite_positive("swiglu_limit", self.swiglu_limit)
        if self.parallel is not None and (self.expert_bias or self.activation == "swiglu_oai"):
            raise ValueError(
                "expert_bias and activation='swiglu_oai' run on one device only; expert-parallel experts "
                "(moe.parallel) do not carry them yet"
            )
        if self.num_shared_experts and self.activation == "swiglu_oai":
            raise ValueError("shared experts are 'swiglu' or 'gelu' MLPs; activation='swiglu_oai' has none")
        if self.parallel is not None and not isinstance(self.parallel, ParallelConfig):
            raise TypeError(f"parallel must be None or a ParallelConfig, got {type(self.parallel).__name__}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int):
            raise TypeError(f"num_shared_experts must be an int, got {self.num_shared_experts!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_hidden_dim is not None:
            _check_positive_int("shared_expert_hidden_dim", self.shared_expert_hidden_dim)
            if self.num_shared_experts == 0:
                raise ValueError(
                    "shared_expert_hidden_dim is set but num_shared_experts is 0; set num_shared_experts=1"
                )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be a bool, got {type(self.residual).__name__} ({self.residual!r})")
        if self.residual_hidden_dim is not None:
            _check_positive_int("residual_hidden_dim", self.residual_hidden_dim)
            if not self.residual:
                raise ValueError("residual_hidden_dim is set but residual is False; set residual=True")
        if self.capacity_factor is not None and not 0 <= self.capacity_factor < float("inf"):
            raise ValueError(
                f"capacity_factor must be None/0 (dropless) or a finite number > 0, got {self.capacity_factor}"
            )
        if self.router == "aux_free" and isinstance(self.router_config, AuxFreeConfig):
            cfg = self.router_config
            if self.num_experts % cfg.n_group:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({cfg.n_group})")
            if cfg.n_group > 1 and cfg.group_score == "top2_sum" and self.num_experts // cfg.n_group < 2:
                raise ValueError(
                    f"group-limited routing scores each group by its top-2 experts, so each of the "
                    f"{cfg.n_group} groups needs >= 2 experts (num_experts={self.num_experts})"
                )
            if cfg.n_group > 1 and self.top_k > cfg.topk_group * (self.num_experts // cfg.n_group):
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the experts in the kept groups "
                    f"(topk_group {cfg.topk_group} x {self.num_experts // cfg.n_group}); raise topk_group"
                )

    @property
    def shared_hidden_dim(self) -> int:
        """Hidden width of the shared-expert MLP: shared_expert_hidden_dim, else num_shared_experts * H."""
        if self.shared_expert_hidden_dim is not None:
            return self.shared_expert_hidden_dim
        return self.num_shared_experts * self.hidden_dim

    @property
    def residual_dim(self) -> int:
        """Width of the Residual MoE dense branch (0 without one)."""
        if not self.residual:
            return 0
        return self.residual_hidden_dim if self.residual_hidden_dim is not None else self.hidden_dim

    @property
    def dropless(self) -> bool:
        """True when no capacity factor is set, so no routed copy is ever dropped."""
        return not self.capacity_factor
