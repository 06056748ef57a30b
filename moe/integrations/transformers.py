"""Hugging Face transformers interop: build moe.MoE from HF sparse MoE blocks, patch whole models.

    layer = from_hf(model.model.layers[0].mlp)   # same routing and outputs, weights copied
    n = patch(model)                             # every supported block now runs moe.MoE

    n = unpatch(model)                           # the HF blocks back, with our (fine-tuned) weights
    scan(model)                                  # which blocks patch() converts, and why others not

Supported blocks (transformers 5.x fused experts, and 4.57-style per-expert ModuleLists):
Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE, OLMoE, DeepSeek-V3 (aux-loss-free
router, group-limited selection, ungated shared experts), DeepSeek-V2 (softmax, greedy or
group_limited_greedy), GLM-4.5 / GLM-4.5-lite / GLM-4.5V text (DeepSeek-V3 routing), dots1,
MiniMax, Qwen3-Next, Jamba, Granite-MoE (+Shared: its shared_mlp sits outside the block and stays
HF's), PhiMoE (sparsemixer top-2, eval mode only: training-mode sparsemixer samples and raises),
GPT-OSS (router bias, softmax over the top-k logits; experts with biases and the clamped
"swiglu_oai" activation, interleaved gate/up columns de-interleaved on the way in; one device, no fused kernel),
EXAONE-MoE, MiniCPM5-MoE and Solar-Open (GLM-4.5 routing), Mellum (Qwen3-MoE routing), Qwen3-VL-MoE
text and Qwen3.5-MoE (Mixtral routing; Qwen3.5 with a gated shared expert), MiniMax-M2 (sigmoid +
bias top-k, renormalised; the bias lives on the block), ERNIE 4.5 MoE (softmax + bias top-k,
renormalised; the bias is a [1, E] parameter in gate.moe_statics), Granite-MoE-SWA and -Hybrid (Granite).
Blocks that hold `experts` but are not one of these are left untouched with a warning naming the
block and the reason (REFUSED_BLOCKS: known and why, e.g. Llama 4, JetMoE; other classes: unverified math).
transformers itself is never imported: blocks are recognised by class name (moe.integrations.hf_families).

After patch(): output_router_logits=True works (our blocks hand HF's output collector the router
logits, so HF's own aux loss comes from our routers); moe.aux_loss(model) also works.
unpatch(model) before save_pretrained gives a checkpoint the unpatched HF class loads
(unpatch(model, merge_adapters=True) with LoRA-MoE adapters: plain LoRA / MoS folded into the weights).

Differences that remain, by design:
    - By default our routers compute logits in fp32 from fp32 copies of x and W; HF's Mixtral /
      Qwen / OLMoE / MiniMax / Jamba / Granite / PhiMoE routers compute them in the model dtype,
      so bf16/fp16 routing can differ on near-ties (fp32 models match exactly).
      patch(model, routing_dtype="model") routes HF's way: ids and gate weights bit for bit.
    - Mixtral's training jitter multiplies the expert input too in HF; ours scales the router input only.
    - DeepSeek-V3 on 4.57 masked dropped groups with 0.0 (a bug); we use -inf like 5.x.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import AuxFreeConfig, TopKConfig
from moe.integrations.hf_families import (
    PER_EXPERT_NAMES,
    SUPPORTED_BLOCKS,
    FamilySpec,
    bias_holder,
    check_silu,
    expert_weights,
    interleave,
    read_option,
    spec_for,
)
from moe.layer import MoE
from moe.routing import Router
from moe.routing.sparsemixer import SparseMixerRouter

__all__ = [
    "from_hf",
    "patch",
    "unpatch",
    "to_hf",
    "scan",
    "BlockReport",
    "HFMoEBlock",
    "SUPPORTED_BLOCKS",
    "REFUSED_BLOCKS",
]


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """target takes a detached copy of value, with value's dtype and device (shapes must agree)."""
    if target.shape != value.shape:
        raise ValueError(
            f"shape mismatch while copying HF weights: ours {tuple(target.shape)}, HF {tuple(value.shape)}"
        )
    target.data = value.detach().clone().contiguous()


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return value


ROUTING_DTYPES = ("float32", "model")


def _with_routing_dtype(config: Any, spec: FamilySpec, routing_dtype: str) -> Any:
    """The router config routing as HF does in half precision (routing_dtype="model"), or as it is."""
    if routing_dtype not in ROUTING_DTYPES:
        raise ValueError(f"routing_dtype must be one of {ROUTING_DTYPES}, got {routing_dtype!r}")
    if routing_dtype == "float32":
        return config
    if isinstance(config, AuxFreeConfig):  # HF routes aux-free families in fp32, but for MiniMax-M2's logits
        return dataclasses.replace(config, routing_dtype="model") if spec.aux_free_logits_in_model_dtype else config
    if isinstance(config, TopKConfig):
        return dataclasses.replace(config, routing_dtype="model", round_weights=spec.rounds_weights)
    return dataclasses.replace(config, routing_dtype="model")  # sparsemixer: all in the model dtype


def _build(
    block: nn.Module, spec: FamilySpec, backend: str, overrides: dict[str, Any], routing_dtype: str = "float32"
) -> tuple[MoE, bool]:
    check_silu(block)
    weights = expert_weights(block)
    num_experts, dim, width = weights.w_in.shape
    gate = getattr(block, spec.router_attr)
    router_weight: torch.Tensor = gate.weight
    if tuple(router_weight.shape) != (num_experts, dim):
        raise TypeError(
            f"{type(block).__name__}.{spec.router_attr}.weight has shape {tuple(router_weight.shape)}, expected "
            f"[num_experts, dim] = [{num_experts}, {dim}]"
        )
    router_config = spec.router_config(block)
    if getattr(gate, "bias", None) is not None and not getattr(router_config, "bias", False):
        raise TypeError(f"{type(block).__name__}.{spec.router_attr} has a bias; this family's router has none")
    if overrides:
        allowed = {f.name for f in dataclasses.fields(router_config)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise TypeError(
                f"unknown router override(s) {unknown} for {spec.family} ({type(router_config).__name__}); "
                f"it accepts {sorted(allowed)}"
            )
        router_config = dataclasses.replace(router_config, **overrides)
    router_config = _with_routing_dtype(router_config, spec, routing_dtype)
    top_k = int(_top_k(block))
    shared = getattr(block, spec.shared_expert) if spec.shared_expert else None
    shared_gate = getattr(block, spec.shared_expert_gate) if spec.shared_expert_gate else None
    shared_hidden = int(shared.down_proj.weight.shape[1]) if shared is not None else None

    router: str | Router = spec.router
    if spec.router == "sparsemixer":
        with torch.device(router_weight.device):
            router = SparseMixerRouter(dim, num_experts, top_k, router_config)
    with torch.device(router_weight.device):
        layer = MoE(
            dim,
            width // 2,
            num_experts,
            top_k,
            router,
            num_shared_experts=1 if shared is not None else 0,
            shared_expert_hidden_dim=shared_hidden,
            shared_expert_gate=shared_gate is not None,
            backend=backend,
            router_config=None if isinstance(router, Router) else router_config,
            activation=spec.activation,
            expert_bias=weights.b_in is not None,
            swiglu_alpha=float(getattr(block.experts, "alpha", 1.702)),
            swiglu_limit=float(getattr(block.experts, "limit", 7.0)),
        )
    _copy_into(layer.experts.w_in, weights.w_in)
    _copy_into(layer.experts.w_out, weights.w_out)
    if weights.b_in is not None and weights.b_out is not None:
        assert layer.experts.b_in is not None and layer.experts.b_out is not None
        _copy_into(layer.experts.b_in, weights.b_in)
        _copy_into(layer.experts.b_out, weights.b_out)
    _copy_into(_tensor(layer.router, "weight"), router_weight)
    if getattr(router_config, "bias", False):
        _copy_into(_tensor(layer.router, "bias"), gate.bias)
    bias = getattr(bias_holder(block, spec), "e_score_correction_bias", None)
    if spec.router == "aux_free" and isinstance(bias, torch.Tensor):  # the bias stays fp32 in any dtype
        _copy_into(_tensor(layer.router, "e_score_correction_bias"), bias.float().reshape(-1))
    if shared is not None:
        assert layer.shared_experts is not None
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy_into(getattr(layer.shared_experts, name).weight, getattr(shared, name).weight)
    if shared_gate is not None:
        assert layer.shared_expert_gate is not None
        _copy_into(layer.shared_expert_gate.weight, shared_gate.weight)
    layer.train(block.training)
    return layer, (weights.per_expert and spec.per_expert_returns_logits) or spec.returns_tuple


def _top_k(block: nn.Module) -> int:
    return int(read_option(block, "top_k", "num_experts_per_tok"))


def from_hf(block: nn.Module, *, backend: str = "auto", routing_dtype: str = "float32", **router_overrides: Any) -> MoE:
    """Builds a moe.MoE with the same routing and (copied) weights as a Hugging Face MoE block.

    Args:
        block: e.g. MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock,
            OlmoeSparseMoeBlock, DeepseekV3MoE, DeepseekV2Moe (see SUPPORTED_BLOCKS).
        backend: op backend of the new layer.
        routing_dtype: "float32" (default: logits from fp32 copies of x and W) or "model": route
            exactly as the HF router does in the model's dtype (bf16/fp16 logits, then HF's
            softmax / top-k / renormalisation and gate-weight dtype), so the expert ids and gate
            weights equal HF's bit for bit in half precision. DeepSeek-V2/V3, GLM-4.5 and dots1
            route in fp32 in HF too: for them both values are the same.
        **router_overrides: fields of the derived router config to replace, e.g.
            aux_loss_coef=1e-2 (top-k families; default 0.0, as HF blocks add no loss themselves)
            or seq_aux_loss_coef=1e-4 / bias_update_rate (DeepSeek).

    Returns:
        A new layer on the block's device; parameters are copies in the block's dtype (the
        aux-free bias stays fp32). layer(x [..., D]) equals the block's hidden-state output.

    Raises:
        TypeError: the block's class is not supported (the message lists the supported ones),
            its experts use a layout or activation moe.MoE cannot represent, or an override is unknown.
    """
    layer, _ = _build(block, spec_for(block), backend, router_overrides, routing_dtype)
    return layer


def _hf_collector() -> dict[str, Any] | None:
    """transformers' active output collector (5.x output_router_logits), if transformers is loaded."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    active = getattr(capturing, "_active_collector", None)
    if active is None:
        return None
    collected: dict[str, Any] | None = active.get()
    return collected


class HFMoEBlock(nn.Module):
    """Stands in for a Hugging Face sparse MoE block inside a transformers model.

    forward(hidden_states [B, S, D]) returns what the replaced block returned: the hidden states
    [B, S, D] (transformers 5.x), or (hidden_states, router_logits [B*S, E]) for 4.57-style
    Mixtral/Qwen/OLMoE blocks. When the model runs with output_router_logits=True, the router
    logits [B*S, E] (x W^T, in the dtype HF computes them in) are handed to transformers' output
    collector, so HF's own load-balancing loss is computed from our router.

    The replaced HF block is kept as an empty skeleton on the meta device (no memory, not in
    state_dict) so that unpatch() can rebuild it from our weights.
    """

    def __init__(self, layer: MoE, returns_router_logits: bool, source: str, spec: FamilySpec | None = None) -> None:
        super().__init__()
        self.moe = layer
        self.returns_router_logits = returns_router_logits
        self.source = source
        self.spec = spec
        self._hf_skeleton: nn.Module | None = None  # set by patch(); a plain attribute, not a submodule

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[T, E] logits as the HF router computes them (model dtype, or fp32 for GLM-4.5 / dots1 / DeepSeek-V3)."""
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        weight = _tensor(self.moe.router, "weight")
        bias = getattr(self.moe.router, "bias", None)
        if self.spec is not None and self.spec.router_logits_fp32:
            return F.linear(x_TD.float(), weight.float())
        return F.linear(x_TD, weight.to(x_TD.dtype), None if bias is None else bias.to(x_TD.dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, S, D] -> the HF block's output form: a tensor, or (tensor, router logits)."""
        out = self.moe(hidden_states)
        collected = _hf_collector()
        if collected is not None and "router_logits" in collected:
            collected["router_logits"].append(self.router_logits(hidden_states))
        if not self.returns_router_logits:
            return out
        return out, self.router_logits(hidden_states)

    def extra_repr(self) -> str:
        return f"replaces={self.source}, returns_router_logits={self.returns_router_logits}"


# Blocks we recognise but do not convert, and why (patch leaves them untouched). Read in
# transformers 5.25; any other block holding `experts` gets the generic "unverified" reason.
REFUSED_BLOCKS: dict[str, str] = {
    "Llama4TextMoe": "Llama 4 scales each expert's input by its sigmoid gate (routed_in = x * score), not the "
    "expert's output; with nonlinear experts moe.MoE's output weighting is a different function",
    "Ernie4_5_VLMoeSparseMoeBlock": "ERNIE 4.5 VL routes text and vision tokens to separate expert sets; not "
    "mapped onto our routers",
    "HunYuanMoEV1Moe": "HunYuan's gate (gate.wg, per-layer expert counts and top-k) is not mapped onto our routers yet",
    "NemotronHMoE": "its experts use ReLU^2 (ReLUSquaredActivation); moe.MoE experts are SwiGLU",
    "ErgoMoE": "its experts use ReLU^2 (ReLUSquaredActivation); moe.MoE experts are SwiGLU",
    "SwitchTransformersSparseMLP": "encoder-decoder Switch MLP with capacity-limited top-1 and dense experts "
    "(ReLU, no gate); moe.MoE experts are SwiGLU",
    "JetMoeMoE": "JetMoE's MoE MLP keeps its experts as input_linear / output_linear (no `experts` module) and "
    "adds a learned output bias after the experts; not mapped onto moe.MoE yet",
    "JetMoeMoA": "JetMoE's mixture-of-attention-heads routes attention projections, not MLPs; moe.MoE is an MLP layer",
    "NllbMoeSparseMLP": "NLLB's capacity-limited top-2 with its second-expert policy and ReLU experts; "
    "moe.MoE experts are SwiGLU",
}


@dataclass(frozen=True)
class BlockReport:
    """One MoE-like block found by scan(): converted (family set, reason None) or left untouched (reason)."""

    name: str
    block_class: str
    family: str | None
    reason: str | None


def _looks_like_moe(module: nn.Module) -> bool:
    if type(module).__module__.split(".")[0] == "moe":
        return False
    if type(module).__name__ in SUPPORTED_BLOCKS or type(module).__name__ in REFUSED_BLOCKS:
        return True
    return isinstance(getattr(module, "experts", None), nn.Module)


def _refusal(block: nn.Module) -> str | None:
    """None if patch() can convert block exactly, else why not."""
    name = type(block).__name__
    if name in REFUSED_BLOCKS:
        return REFUSED_BLOCKS[name]
    if name not in SUPPORTED_BLOCKS:
        return "not a recognised sparse-MoE family: its routing and expert math are unverified"
    try:
        spec = spec_for(block)
        check_silu(block)
        expert_weights(block)
        spec.router_config(block)
        gate = getattr(block, spec.router_attr)
        if getattr(gate, "bias", None) is not None and not getattr(spec.router_config(block), "bias", False):
            return f"{spec.router_attr} has a bias; this family's router has none"
    except TypeError as e:
        return str(e)
    return None


def scan(model: nn.Module) -> list[BlockReport]:
    """Every sparse-MoE-like block in `model` (a module holding `experts`, or a known class), outermost
    only, with the family patch() would convert it as, or the reason it leaves it untouched."""
    reports: list[BlockReport] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside) or not name or not _looks_like_moe(module):
            continue
        inside.append(name)
        reason = _refusal(module)
        family = None if reason is not None else spec_for(module).family
        reports.append(BlockReport(name, type(module).__name__, family, reason))
    return reports


def patch(
    model: nn.Module,
    *,
    backend: str = "auto",
    strict: bool = False,
    routing_dtype: str = "float32",
    **router_overrides: Any,
) -> int:
    """Replaces every supported sparse MoE block inside `model` in place with an HFMoEBlock.

    Weights are copied, then the HF block is dropped from the model (kept as an empty meta
    skeleton for unpatch()). Logits, losses, output_router_logits / HF's aux loss and generate()
    stay the same (fp32).

    Blocks that look like MoE blocks (they hold `experts`) but whose math moe.MoE cannot express
    exactly are left untouched, with one UserWarning naming each block and why (scan(model)
    returns the same report); strict=True raises TypeError instead.

    Args:
        model: any nn.Module, typically a transformers PreTrainedModel.
        backend, routing_dtype, **router_overrides: as in from_hf, applied to every block
            (routing_dtype="model": HF's half-precision routing bit for bit, hence its greedy tokens).
        strict: raise on the first block left untouched instead of warning.

    Returns:
        The number of blocks replaced (0 if none is supported).

    Raises:
        ValueError: `model` itself is a supported block (use from_hf for that).
        TypeError: strict=True and some block cannot be converted.
    """
    if type(model).__name__ in SUPPORTED_BLOCKS:
        raise ValueError(
            f"patch() replaces blocks inside a model; for a bare {type(model).__name__} call from_hf(block)"
        )
    reports = scan(model)
    refused = [r for r in reports if r.reason is not None]
    if refused:
        lines = "; ".join(f"{r.name} ({r.block_class}): {r.reason}" for r in refused)
        if strict:
            raise TypeError(f"patch(): cannot convert {lines}")
        warnings.warn(f"patch(): left {len(refused)} block(s) untouched: {lines}", stacklevel=2)
    targets = [(r.name, model.get_submodule(r.name)) for r in reports if r.reason is None]
    for name, block in targets:
        spec = spec_for(block)
        layer, returns_logits = _build(block, spec, backend, router_overrides, routing_dtype)
        wrapper = HFMoEBlock(layer, returns_logits, type(block).__name__, spec)
        wrapper.train(block.training)
        object.__setattr__(wrapper, "_hf_skeleton", block.to("meta"))  # not a submodule: not in state_dict
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper)
    return len(targets)


def _assign(target: nn.Module, name: str, value: torch.Tensor, written: set[int]) -> None:
    """target.<name> (a parameter or buffer of the meta skeleton) takes a copy of value."""
    current = getattr(target, name)
    if tuple(current.shape) != tuple(value.shape):
        raise ValueError(
            f"unpatch: {type(target).__name__}.{name} is {tuple(current.shape)}, ours {tuple(value.shape)}"
        )
    data = value.detach().clone().contiguous()
    if isinstance(current, nn.Parameter):
        setattr(target, name, nn.Parameter(data, requires_grad=current.requires_grad))
    else:
        persistent = name not in target._non_persistent_buffers_set
        data = data.to(current.dtype) if name == "e_score_correction_bias" else data  # HF keeps it fp32
        target.register_buffer(name, data, persistent=persistent)
    written.add(id(getattr(target, name)))


def to_hf(wrapper: HFMoEBlock) -> nn.Module:
    """The original HF block class rebuilt with the wrapper's current weights (inverse of patch())."""
    block, spec = wrapper._hf_skeleton, wrapper.spec
    if block is None or spec is None:
        raise ValueError(f"{wrapper.source}: this HFMoEBlock was not made by patch(); nothing to restore")
    layer = wrapper.moe
    block = copy.deepcopy(block)
    written: set[int] = set()
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    hidden = w_out.shape[1]
    experts: Any = block.experts
    if spec.activation == "swiglu_oai":  # GPT-OSS: x @ w layout, interleaved gate/up, biases
        assert layer.experts.b_in is not None and layer.experts.b_out is not None
        _assign(experts, "gate_up_proj", interleave(w_in), written)
        _assign(experts, "gate_up_proj_bias", interleave(layer.experts.b_in), written)
        _assign(experts, "down_proj", w_out, written)
        _assign(experts, "down_proj_bias", layer.experts.b_out, written)
    elif isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        _assign(experts, "gate_up_proj", w_in.transpose(1, 2), written)
        _assign(experts, "down_proj", w_out.transpose(1, 2), written)
    else:
        names = next(n for n in PER_EXPERT_NAMES if hasattr(experts[0], n[0]))
        for e, mlp in enumerate(experts):
            _assign(getattr(mlp, names[0]), "weight", w_in[e, :, :hidden].t(), written)
            _assign(getattr(mlp, names[1]), "weight", w_in[e, :, hidden:].t(), written)
            _assign(getattr(mlp, names[2]), "weight", w_out[e].t(), written)
    gate = getattr(block, spec.router_attr)
    _assign(gate, "weight", _tensor(layer.router, "weight"), written)
    if isinstance(getattr(gate, "bias", None), torch.Tensor):
        _assign(gate, "bias", _tensor(layer.router, "bias"), written)
    holder = bias_holder(block, spec)
    if isinstance(getattr(holder, "e_score_correction_bias", None), torch.Tensor):
        ours = _tensor(layer.router, "e_score_correction_bias")  # [E]; ERNIE keeps [1, E]
        _assign(
            holder, "e_score_correction_bias", ours.reshape(_tensor(holder, "e_score_correction_bias").shape), written
        )
    if spec.shared_expert and getattr(block, spec.shared_expert) is not None:  # ERNIE may have none
        assert layer.shared_experts is not None
        shared = getattr(block, spec.shared_expert)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            _assign(getattr(shared, proj), "weight", getattr(layer.shared_experts, proj).weight, written)
    if spec.shared_expert_gate:
        assert layer.shared_expert_gate is not None
        _assign(getattr(block, spec.shared_expert_gate), "weight", layer.shared_expert_gate.weight, written)
    missing = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if id(t) not in written]
    if missing:
        raise ValueError(f"unpatch: {wrapper.source} has state we do not carry: {missing}")
    block.train(wrapper.training)
    return block


def unpatch(model: nn.Module, *, merge_adapters: bool = False) -> int:
    """Puts the original HF blocks back in place of every HFMoEBlock made by patch(), with the
    current (e.g. fine-tuned) weights, so model.save_pretrained(dir) loads into the unpatched HF
    class. Returns the number of blocks restored.

    LoRA-MoE adapters (moe.lora) are not part of any HF class, so a model carrying them is refused
    unless merge_adapters=True, which first folds them into the weights they adapt (moe.lora.merge_lora_moe:
    exact for plain LoRA, i.e. one expert, and MoS). A routed mixture (more than one LoRA expert) cannot
    be folded: it is refused either way, and the message says to keep it as an adapter file.

    Raises:
        ValueError: adapters present and merge_adapters=False, or routed adapters (model unchanged).
    """
    from moe.lora import adapter_modules, merge_lora_moe

    adapters = list(adapter_modules(model))
    if adapters and not merge_adapters:
        raise ValueError(
            f"unpatch: the model carries {len(adapters)} LoRA-MoE adapter(s), e.g. {adapters[:3]}, which "
            "save_pretrained would write under names the HF class cannot load; fold them into the weights "
            "first: unpatch(model, merge_adapters=True) or moe.lora.merge_lora_moe(model)"
        )
    if adapters:
        merge_lora_moe(model)  # raises, changing nothing, on routed adapters
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    for name, wrapper in targets:
        block = to_hf(wrapper)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, block)
    return len(targets)
