"""One small spec per Hugging Face sparse-MoE family: what it routes with and where its weights live.

Blocks are recognised by class name, so transformers is never imported here and remote-code
ports with the same names (e.g. DeepSeek's own modeling_deepseek.py) are read the same way.

Shape legend: T tokens, D model dim, I expert hidden dim (HF "intermediate"), E experts.

Weight layouts read (both give our Experts.w_in [E, D, 2I] with the gate in [:I], w_out [E, I, D]):
    fused (transformers 5.x): experts.gate_up_proj [E, 2I, D] (rows [:I] gate), experts.down_proj [E, D, I].
    per_expert (transformers 4.57 and remote code): experts = ModuleList of MLPs with nn.Linear
        (w1 gate, w3 up, w2 down) or (gate_proj, up_proj, down_proj).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe.config import AuxFreeConfig, RouterConfig, TopKConfig

__all__ = [
    "FamilySpec",
    "spec_for",
    "ExpertWeights",
    "expert_weights",
    "gpt_oss_weights",
    "interleave",
    "deinterleave",
    "bias_holder",
    "read_option",
    "check_silu",
]

_MISSING = object()

# (gate, up, down) attribute names of one per-expert MLP, in the order tried.
PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def read_option(block: nn.Module, *names: str, default: Any = _MISSING) -> Any:
    """First attribute among `names` on block.gate (or block.router), then block, then block.config."""
    holders = [getattr(block, "gate", None), getattr(block, "router", None), block, getattr(block, "config", None)]
    for holder in holders:
        for name in names:
            value = getattr(holder, name, _MISSING) if holder is not None else _MISSING
            if value is not _MISSING and value is not None:
                return value
    if default is _MISSING:
        raise TypeError(f"{type(block).__name__} has none of the attributes {names} on its gate, itself or its config")
    return default


def _mixtral_router(block: nn.Module) -> RouterConfig:
    # Mixtral always renormalises; HF's jitter also scales the experts' input (ours: the router's only).
    return TopKConfig(
        norm_topk_prob=True, aux_loss_coef=0.0, jitter=float(read_option(block, "jitter_noise", default=0.0))
    )


def _softmax_topk_router(block: nn.Module) -> RouterConfig:
    return TopKConfig(norm_topk_prob=bool(read_option(block, "norm_topk_prob")), aux_loss_coef=0.0)


def _unnormalised_topk_router(block: nn.Module) -> RouterConfig:
    # Jamba: softmax top-k weights left unnormalised.
    return TopKConfig(norm_topk_prob=False, aux_loss_coef=0.0)


def _normalised_topk_router(block: nn.Module) -> RouterConfig:
    # Granite-MoE: softmax over the top-k logits (== the top-k softmax probabilities renormalised,
    # up to rounding; computed HF's way).
    return TopKConfig(norm_topk_prob=True, aux_loss_coef=0.0, softmax_after_topk=True)


def _gpt_oss_router(block: nn.Module) -> RouterConfig:
    # logits = x W^T + b; softmax over the top-k logits, returned in the model dtype.
    return TopKConfig(norm_topk_prob=True, aux_loss_coef=0.0, softmax_after_topk=True, bias=True)


def _sparsemixer_router(block: nn.Module) -> Any:
    from moe.routing.sparsemixer import SparseMixerConfig

    top_k = int(read_option(block, "top_k", "num_experts_per_tok"))
    if top_k != 2:
        raise TypeError(f"{type(block).__name__}: sparsemixer routing is defined for top_k=2 only, got {top_k}")
    return SparseMixerConfig(jitter_eps=float(read_option(block, "router_jitter_noise")))


def _deepseek_v3_router(block: nn.Module) -> RouterConfig:
    return AuxFreeConfig(
        score_func="sigmoid",
        n_group=int(read_option(block, "num_group", "n_group")),
        topk_group=int(read_option(block, "topk_group")),
        routed_scaling_factor=float(read_option(block, "routed_scaling_factor")),
        norm_topk_prob=bool(read_option(block, "norm_topk_prob")),
    )


def _deepseek_v2_router(block: nn.Module) -> RouterConfig:
    # Softmax scores, top-k (optionally within the best groups by max score), no renormalisation,
    # scaled. V2 has no bias, so bias updates are off.
    method = read_option(block, "topk_method", default="greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise TypeError(
            f"{type(block).__name__} with topk_method={method!r} is not supported; "
            "supported: 'greedy', 'group_limited_greedy'"
        )
    limited = method == "group_limited_greedy"
    return AuxFreeConfig(
        score_func="softmax",
        n_group=int(read_option(block, "num_group", "n_group")) if limited else 1,
        topk_group=int(read_option(block, "topk_group")) if limited else 1,
        group_score="max",
        routed_scaling_factor=float(read_option(block, "routed_scaling_factor")),
        norm_topk_prob=False,
        bias_update_rate=0.0,
    )


def _minimax_m2_router(block: nn.Module) -> RouterConfig:
    # sigmoid scores, top-k on score + e_score_correction_bias (held by the block, not its gate),
    # the selected scores renormalised, unscaled, no groups.
    jitter = float(read_option(block, "jitter_noise", default=0.0))
    if jitter > 0:
        raise TypeError(
            f"{type(block).__name__} has router_jitter_noise={jitter}: its training-mode input jitter "
            "(which also scales the experts' input) has no counterpart in our aux-free router"
        )
    return AuxFreeConfig(score_func="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True)


def _ernie_router(block: nn.Module) -> RouterConfig:
    # softmax scores, top-k on score + e_score_correction_bias (gate.moe_statics), the selected scores
    # renormalised (HF clamps the sum at moe_norm_min; a top-k softmax sum is >= K/E, far above it).
    norm_min = float(read_option(block, "moe_norm_min", "norm_min", default=1e-12))
    if norm_min > 1e-6:
        raise TypeError(f"{type(block).__name__}: moe_norm_min={norm_min} can clamp the renormaliser; ours has none")
    if read_option(block, "use_bias", default=False):
        raise TypeError(f"{type(block).__name__}: use_bias=True gives its shared experts biases; ours have none")
    return AuxFreeConfig(score_func="softmax", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True)


@dataclass(frozen=True)
class FamilySpec:
    """How one HF family's sparse MoE block maps onto moe.MoE.

    Attributes:
        family: human name used in messages.
        block_classes: class names of the family's sparse MoE block (one name across versions).
        router: our router name ("topk" or "aux_free").
        router_config: builds our router config from the block's (or its gate's) attributes.
        shared_expert: attribute of the always-on shared MLP, or None.
        shared_expert_gate: attribute of the Linear(D, 1) whose sigmoid scales the shared MLP, or None.
        per_expert_returns_logits: 4.57-style (per-expert) blocks of this family returned
            (hidden [B, S, D], router_logits [T, E]) instead of a tensor; 5.x blocks all return a tensor.
        router_attr: attribute of the block's router (a module with weight [E, D]): "gate" or "router".
        router_logits_fp32: HF computes the router logits from fp32 copies of x and W (GLM-4.5,
            dots1, DeepSeek-V3); otherwise in the model dtype. Used for output_router_logits and
            routing_dtype="model".
        aux_free_logits_in_model_dtype: an aux-free family whose HF router computes x W^T in the
            model dtype (MiniMax-M2; the others use fp32). Used by routing_dtype="model".
        returns_tuple: the 5.x block returns (hidden, router scores) (GPT-OSS; its caller drops the scores).
        activation: "swiglu", or "swiglu_oai" (GPT-OSS: clamped SwiGLU, interleaved gate/up, biases).
        rounds_weights: HF's router returns the gate weights in the model dtype (Qwen, OLMoE,
            Jamba, Granite); Mixtral and MiniMax return them in fp32. Used by routing_dtype="model".
        bias_holder: dotted path from the block to the module holding e_score_correction_bias,
            None for the router itself: "" (the block, MiniMax-M2) or "gate.moe_statics" (ERNIE 4.5,
            a [1, E] parameter).
    """

    family: str
    block_classes: tuple[str, ...]
    router: str
    router_config: Callable[[nn.Module], Any]
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    per_expert_returns_logits: bool = False
    router_attr: str = "gate"
    router_logits_fp32: bool = False
    aux_free_logits_in_model_dtype: bool = False
    rounds_weights: bool = True
    activation: str = "swiglu"
    returns_tuple: bool = False
    bias_holder: str | None = None


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        "Mixtral",
        ("MixtralSparseMoeBlock",),
        "topk",
        _mixtral_router,
        per_expert_returns_logits=True,
        rounds_weights=False,
    ),
    FamilySpec(
        "Qwen2-MoE",
        ("Qwen2MoeSparseMoeBlock",),
        "topk",
        _softmax_topk_router,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
        per_expert_returns_logits=True,
    ),
    FamilySpec("Qwen3-MoE", ("Qwen3MoeSparseMoeBlock",), "topk", _softmax_topk_router, per_expert_returns_logits=True),
    FamilySpec("OLMoE", ("OlmoeSparseMoeBlock",), "topk", _softmax_topk_router, per_expert_returns_logits=True),
    FamilySpec("DeepSeek-V3", ("DeepseekV3MoE",), "aux_free", _deepseek_v3_router, shared_expert="shared_experts"),
    FamilySpec("DeepSeek-V2", ("DeepseekV2Moe", "DeepseekV2MoE"), "aux_free", _deepseek_v2_router, "shared_experts"),
    # DeepSeek-V3 routing (sigmoid, group-limited top-k with e_score_correction_bias, scaled),
    # ungated shared experts; the router computes its logits in fp32.
    FamilySpec(
        "GLM-4.5",
        ("Glm4MoeMoE", "Glm4MoeLiteMoE", "Glm4vMoeTextMoE"),
        "aux_free",
        _deepseek_v3_router,
        shared_expert="shared_experts",
        router_logits_fp32=True,
    ),
    FamilySpec(
        "dots1", ("Dots1MoE",), "aux_free", _deepseek_v3_router, shared_expert="shared_experts", router_logits_fp32=True
    ),
    FamilySpec("MiniMax", ("MiniMaxSparseMoeBlock",), "topk", _mixtral_router, rounds_weights=False),
    FamilySpec(
        "Qwen3-Next",
        ("Qwen3NextSparseMoeBlock",),
        "topk",
        _softmax_topk_router,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    FamilySpec("Jamba", ("JambaSparseMoeBlock",), "topk", _unnormalised_topk_router, router_attr="router"),
    FamilySpec(
        "Granite-MoE",
        ("GraniteMoeMoE", "GraniteMoeSharedMoE", "GraniteMoeSWAMoE", "GraniteMoeHybridMoE"),
        "topk",
        _normalised_topk_router,
        router_attr="router",
    ),
    FamilySpec(
        "GPT-OSS",
        ("GptOssMLP",),
        "topk",
        _gpt_oss_router,
        router_attr="router",
        activation="swiglu_oai",
        returns_tuple=True,
    ),
    FamilySpec("PhiMoE", ("PhimoeSparseMoeBlock",), "sparsemixer", _sparsemixer_router, router_attr="router"),
    # Found by comparing every MoE block of transformers 5.25 with our routers on tiny random
    # configs, then read: the same math as the family named in the comment.
    # GLM-4.5 / DeepSeek-V3 routing (fp32 router, sigmoid + bias, group-limited, scaled), ungated shared experts:
    FamilySpec(
        "EXAONE-MoE",
        ("ExaoneMoeSparseMoEBlock",),
        "aux_free",
        _deepseek_v3_router,
        shared_expert="shared_experts",
        router_logits_fp32=True,
    ),
    FamilySpec(
        "MiniCPM5-MoE",
        ("MiniCPM5MoeMoE",),
        "aux_free",
        _deepseek_v3_router,
        shared_expert="shared_experts",
        router_logits_fp32=True,
    ),
    FamilySpec(
        "Solar-Open",
        ("SolarOpenMoE",),
        "aux_free",
        _deepseek_v3_router,
        shared_expert="shared_experts",
        router_logits_fp32=True,
    ),
    FamilySpec("Mellum", ("MellumSparseMoeBlock",), "topk", _softmax_topk_router),  # Qwen3-MoE routing
    # Mixtral routing (softmax top-k, always renormalised); Qwen3.5 adds Qwen2-MoE's gated shared expert.
    FamilySpec("Qwen3-VL-MoE", ("Qwen3VLMoeTextSparseMoeBlock",), "topk", _mixtral_router),
    FamilySpec(
        "Qwen3.5-MoE",
        ("Qwen3_5MoeSparseMoeBlock",),
        "topk",
        _mixtral_router,
        shared_expert="shared_expert",
        shared_expert_gate="shared_expert_gate",
    ),
    FamilySpec(
        "MiniMax-M2",
        ("MiniMaxM2SparseMoeBlock",),
        "aux_free",
        _minimax_m2_router,
        bias_holder="",
        aux_free_logits_in_model_dtype=True,
    ),
    FamilySpec(
        "ERNIE-4.5-MoE",
        ("Ernie4_5_MoeSparseMoeBlock",),
        "aux_free",
        _ernie_router,
        shared_expert="shared_experts",
        router_logits_fp32=True,
        bias_holder="gate.moe_statics",
    ),
)

SPECS_BY_CLASS: dict[str, FamilySpec] = {name: spec for spec in FAMILIES for name in spec.block_classes}
SUPPORTED_BLOCKS: tuple[str, ...] = tuple(SPECS_BY_CLASS)


def bias_holder(block: nn.Module, spec: FamilySpec) -> nn.Module:
    """The module of `block` that holds the family's e_score_correction_bias (see FamilySpec.bias_holder)."""
    if spec.bias_holder is None:
        holder: nn.Module = getattr(block, spec.router_attr)
        return holder
    return block.get_submodule(spec.bias_holder)


def spec_for(block: nn.Module) -> FamilySpec:
    """The family spec of `block`, or TypeError naming its class and the supported ones."""
    spec = SPECS_BY_CLASS.get(type(block).__name__)
    if spec is None:
        raise TypeError(
            f"{type(block).__name__} is not a supported Hugging Face sparse MoE block; "
            f"supported: {', '.join(SUPPORTED_BLOCKS)}"
        )
    return spec


@dataclass
class ExpertWeights:
    """Routed-expert weights in our layout (views of the HF tensors; the caller copies).

    w_in: [E, D, 2I], columns [:I] gate, [I:] up. w_out: [E, I, D]. per_expert: read from a ModuleList.
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    per_expert: bool
    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None


def gpt_oss_weights(block: nn.Module) -> ExpertWeights:
    """GPT-OSS's experts: gate_up_proj [E, D, 2I] with gate/up interleaved (even/odd columns) and
    gate_up_proj_bias [E, 2I], down_proj [E, I, D] and down_proj_bias [E, D]; de-interleaved here
    into our [gate | up] halves."""
    experts: Any = block.experts
    gate_up = getattr(experts, "gate_up_proj", None)
    bias = getattr(experts, "gate_up_proj_bias", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError(f"{type(block).__name__}.experts has no gate_up_proj / gate_up_proj_bias (GPT-OSS layout)")
    return ExpertWeights(deinterleave(gate_up), experts.down_proj, False, deinterleave(bias), experts.down_proj_bias)


def deinterleave(columns: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's interleaved [..., 2I] (gate even, up odd) -> our [gate | up] halves (inverse of interleave)."""
    return torch.cat([columns[..., ::2], columns[..., 1::2]], dim=-1)


def interleave(halves: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with [gate | up] halves -> GPT-OSS's interleaved columns (gate even, up odd)."""
    hidden = halves.shape[-1] // 2
    return torch.stack([halves[..., :hidden], halves[..., hidden:]], dim=-1).reshape(halves.shape)


def _linear_weight(module: nn.Module, name: str, block: nn.Module) -> torch.Tensor:
    linear = getattr(module, name)
    if getattr(linear, "bias", None) is not None:
        raise TypeError(f"{type(block).__name__}: expert projection {name} has a bias; moe.Experts has none")
    weight: torch.Tensor = linear.weight
    return weight


def expert_weights(block: nn.Module) -> ExpertWeights:
    """Reads block.experts in the fused (5.x) or per-expert (4.57) layout (GPT-OSS: its own)."""
    experts = getattr(block, "experts", None)
    name = type(block).__name__
    if SPECS_BY_CLASS.get(name) is not None and SPECS_BY_CLASS[name].activation == "swiglu_oai":
        return gpt_oss_weights(block)
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        for extra in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(experts, extra, None) is not None:
                raise TypeError(f"{name}: experts.{extra} is set; moe.Experts has no biases")
        gate_up_E2ID: torch.Tensor = experts.gate_up_proj  # type: ignore[union-attr]
        down_EDI: torch.Tensor = experts.down_proj  # type: ignore[union-attr]
        return ExpertWeights(gate_up_E2ID.transpose(1, 2), down_EDI.transpose(1, 2), per_expert=False)
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        first = experts[0]
        for gate, up, down in PER_EXPERT_NAMES:
            if all(isinstance(getattr(first, n, None), nn.Linear) for n in (gate, up, down)):
                w_in = [
                    torch.cat([_linear_weight(e, gate, block).t(), _linear_weight(e, up, block).t()], dim=1)
                    for e in experts
                ]
                w_out = [_linear_weight(e, down, block).t() for e in experts]
                return ExpertWeights(torch.stack(w_in), torch.stack(w_out), per_expert=True)
    raise TypeError(
        f"{name}.experts has an unsupported layout ({type(experts).__name__}); supported: fused "
        "gate_up_proj [E, 2I, D] + down_proj [E, D, I] (transformers 5.x), or a ModuleList of MLPs with "
        "w1/w3/w2 or gate_proj/up_proj/down_proj nn.Linear (transformers 4.57)"
    )


def check_silu(block: nn.Module) -> None:
    """moe.Experts computes silu(gate) * up: refuse other activations instead of silently differing
    (GPT-OSS's experts ignore hidden_act: their clamped SwiGLU is fixed)."""
    spec = SPECS_BY_CLASS.get(type(block).__name__)
    if spec is not None and spec.activation != "swiglu":
        return
    experts = block.experts
    holder = experts[0] if isinstance(experts, nn.ModuleList) else experts
    act = getattr(holder, "act_fn", None)
    hidden_act = read_option(block, "hidden_act", default=None)
    is_silu = isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")
    if hidden_act is not None and hidden_act not in ("silu", "swish"):
        is_silu = False
    if act is None and hidden_act is None:
        is_silu = True  # nothing says otherwise; every supported family is SwiGLU by design
    if not is_silu:
        raise TypeError(
            f"{type(block).__name__} uses activation {hidden_act or type(act).__name__}; "
            "moe.MoE experts are SwiGLU (silu(gate) * up) only"
        )
