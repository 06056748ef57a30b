"""Hugging Face transformers interop: build moe.MoE from HF sparse MoE blocks, patch whole models.

    layer = from_hf(model.model.layers[0].mlp)   # same routing and outputs, weights copied
    n = patch(model)                             # every supported block now runs moe.MoE

Supported blocks (transformers 5.x fused experts, and 4.57-style per-expert ModuleLists):
Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE, OLMoE, DeepSeek-V3 (aux-loss-free
router, group-limited selection, ungated shared experts), DeepSeek-V2 (softmax, greedy or
group_limited_greedy).
transformers itself is never imported: blocks are recognised by class name (moe.integrations.hf_families).

Differences that remain, by design:
    - Our routers compute logits in fp32 from fp32 copies of x and W; HF's Mixtral/Qwen/OLMoE
      routers compute them in the model dtype first, so bf16/fp16 routing can differ on near-ties
      (fp32 models match exactly).
    - HF blocks compute no loss; the model adds one only with output_router_logits. After patch()
      HF sees no router logits: use moe.aux_loss(model) (set aux_loss_coef / seq_aux_loss_coef via
      router overrides) and moe.update_routers(model) for DeepSeek-V3's bias.
    - Mixtral's training jitter multiplies the expert input too in HF; ours scales the router input only.
    - DeepSeek-V3 on 4.57 masked dropped groups with 0.0 (a bug); we use -inf like 5.x.
    - A patched model's state_dict uses our names (...mlp.moe.experts.w_in), so save_pretrained
      output no longer loads into the unpatched HF class; there is no converter back yet.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.integrations.hf_families import (
    SUPPORTED_BLOCKS,
    FamilySpec,
    check_silu,
    expert_weights,
    read_option,
    spec_for,
)
from moe.layer import MoE
from moe.routing import Router
from moe.routing.sparsemixer import SparseMixerRouter

__all__ = ["from_hf", "patch", "HFMoEBlock", "SUPPORTED_BLOCKS"]


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


def _build(block: nn.Module, spec: FamilySpec, backend: str, overrides: dict[str, Any]) -> tuple[MoE, bool]:
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
    if getattr(gate, "bias", None) is not None:
        raise TypeError(f"{type(block).__name__}.{spec.router_attr} has a bias; our routers have none")
    router_config = spec.router_config(block)
    if overrides:
        allowed = {f.name for f in dataclasses.fields(router_config)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise TypeError(
                f"unknown router override(s) {unknown} for {spec.family} ({type(router_config).__name__}); "
                f"it accepts {sorted(allowed)}"
            )
        router_config = dataclasses.replace(router_config, **overrides)
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
        )
    _copy_into(layer.experts.w_in, weights.w_in)
    _copy_into(layer.experts.w_out, weights.w_out)
    _copy_into(_tensor(layer.router, "weight"), router_weight)
    bias = getattr(gate, "e_score_correction_bias", None)
    if spec.router == "aux_free" and isinstance(bias, torch.Tensor):
        _copy_into(_tensor(layer.router, "e_score_correction_bias"), bias.float())  # the bias stays fp32 in any dtype
    if shared is not None:
        assert layer.shared_experts is not None
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy_into(getattr(layer.shared_experts, name).weight, getattr(shared, name).weight)
    if shared_gate is not None:
        assert layer.shared_expert_gate is not None
        _copy_into(layer.shared_expert_gate.weight, shared_gate.weight)
    layer.train(block.training)
    return layer, weights.per_expert and spec.per_expert_returns_logits


def _top_k(block: nn.Module) -> int:
    return int(read_option(block, "top_k", "num_experts_per_tok"))


def from_hf(block: nn.Module, *, backend: str = "auto", **router_overrides: Any) -> MoE:
    """Builds a moe.MoE with the same routing and (copied) weights as a Hugging Face MoE block.

    Args:
        block: e.g. MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock,
            OlmoeSparseMoeBlock, DeepseekV3MoE, DeepseekV2Moe (see SUPPORTED_BLOCKS).
        backend: op backend of the new layer.
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
    layer, _ = _build(block, spec_for(block), backend, router_overrides)
    return layer


class HFMoEBlock(nn.Module):
    """Stands in for a Hugging Face sparse MoE block inside a transformers model.

    forward(hidden_states [B, S, D]) returns what the replaced block returned: the hidden states
    [B, S, D] (transformers 5.x), or (hidden_states, router_logits [B*S, E]) for 4.57-style
    Mixtral/Qwen/OLMoE blocks.
    """

    def __init__(self, layer: MoE, returns_router_logits: bool, source: str) -> None:
        super().__init__()
        self.moe = layer
        self.returns_router_logits = returns_router_logits
        self.source = source

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.moe(hidden_states)
        if not self.returns_router_logits:
            return out
        logits_TE = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), _tensor(self.moe.router, "weight"))
        return out, logits_TE

    def extra_repr(self) -> str:
        return f"replaces={self.source}, returns_router_logits={self.returns_router_logits}"


def patch(model: nn.Module, *, backend: str = "auto", **router_overrides: Any) -> int:
    """Replaces every supported sparse MoE block inside `model` in place with an HFMoEBlock.

    Weights are copied, then the HF block is dropped from the model. Logits, losses and
    generate() stay the same (fp32); HF's output_router_logits no longer sees routers (use
    moe.aux_loss(model)).

    Args:
        model: any nn.Module, typically a transformers PreTrainedModel.
        backend, **router_overrides: as in from_hf, applied to every block.

    Returns:
        The number of blocks replaced (0 if none is supported).

    Raises:
        ValueError: `model` itself is a supported block (use from_hf for that).
        TypeError: as in from_hf, for a supported class with an unsupported layout.
    """
    if type(model).__name__ in SUPPORTED_BLOCKS:
        raise ValueError(
            f"patch() replaces blocks inside a model; for a bare {type(model).__name__} call from_hf(block)"
        )
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    config = getattr(model, "config", None)
    if targets and config is not None and getattr(config, "output_router_logits", False):
        # HF would look for router logits the patched blocks no longer record, and fail inside
        # its load_balancing_loss_func; the balance loss now comes from moe.aux_loss(model).
        warnings.warn(
            "patch(): setting config.output_router_logits = False (HF cannot see the routers of the patched "
            "blocks); add moe.aux_loss(model) to your loss for load balancing",
            stacklevel=2,
        )
        config.output_router_logits = False
    for name, block in targets:
        spec = spec_for(block)
        layer, returns_logits = _build(block, spec, backend, router_overrides)
        wrapper = HFMoEBlock(layer, returns_logits, type(block).__name__)
        wrapper.train(block.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper)
    return len(targets)
