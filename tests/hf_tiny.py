"""Tiny random Hugging Face MoE configs (no hub downloads) shared by the HF oracle and patch tests."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
# 5.x: fused expert weights, routers that return (logits, weights, ids), blocks that return hidden
# states only. 4.57: one MLP per expert, plain Linear gates (DeepSeek: (ids, weights)), and
# Mixtral/Qwen/OLMoE blocks that return (hidden, router_logits). Both are supported.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

DIM = 32

_COMMON: dict[str, Any] = dict(
    hidden_size=DIM,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # decisive routing: no near-ties between fp32 summation orders
)

_MLA: dict[str, Any] = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_config(family: str) -> Any:
    """A 2-layer config of `family` with D=32, small experts and non-degenerate routing options."""
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(num_local_experts=6, num_experts_per_tok=2, **_COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
            mlp_only_layers=[0],  # one dense layer: patch() must leave it alone
            **_COMMON,
        )
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(
            num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, head_dim=8, norm_topk_prob=True, **_COMMON
        )
    if family == "olmoe":
        return t.OlmoeConfig(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, **_COMMON)
    if family == "olmoe_norm":
        return t.OlmoeConfig(num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, **_COMMON)
    if family == "deepseek_v3":
        return t.DeepseekV3Config(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            **_MLA,
            **_COMMON,
        )
    if family == "deepseek_v2":
        return t.DeepseekV2Config(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=1,
            routed_scaling_factor=2.0,
            first_k_dense_replace=1,
            **_MLA,
            **_COMMON,
        )
    if family == "deepseek_v2_group":
        config = tiny_config("deepseek_v2")
        config.topk_method, config.n_group, config.topk_group = "group_limited_greedy", 4, 2
        return config
    if family == "glm4_moe":
        return t.Glm4MoeConfig(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            head_dim=8,
            **_COMMON,
        )
    if family == "dots1":
        return t.Dots1Config(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=1,
            head_dim=8,
            **_COMMON,
        )
    if family == "minimax":
        return t.MiniMaxConfig(num_local_experts=6, num_experts_per_tok=2, head_dim=8, **_COMMON)
    if family == "qwen3_next":
        return t.Qwen3NextConfig(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=True,
            head_dim=8,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
            **_COMMON,
        )
    if family == "jamba":
        return t.JambaConfig(
            num_experts=6,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
            **_COMMON,
        )
    if family == "granitemoe":
        return t.GraniteMoeConfig(num_local_experts=6, num_experts_per_tok=2, **_COMMON)
    if family == "granitemoeshared":
        return t.GraniteMoeSharedConfig(
            num_local_experts=6, num_experts_per_tok=2, shared_intermediate_size=40, **_COMMON
        )
    if family == "phimoe":
        return t.PhimoeConfig(num_local_experts=6, num_experts_per_tok=2, **_COMMON)
    if family == "gpt_oss":
        return t.GptOssConfig(num_local_experts=6, num_experts_per_tok=2, head_dim=8, **_COMMON)
    grouped = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8)
    if family == "exaone_moe":
        return t.ExaoneMoeConfig(
            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, num_shared_experts=1,
            first_k_dense_replace=1, **grouped, **_COMMON,
        )  # fmt: skip
    if family == "minicpm5_moe":
        return t.MiniCPM5MoeConfig(
            n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, n_shared_experts=1,
            mlp_layer_types=["dense", "sparse"], **grouped, **_COMMON,
        )  # fmt: skip
    if family == "solar_open":
        return t.SolarOpenConfig(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            n_shared_experts=1,
            **grouped,
            **_COMMON,
        )
    if family == "qwen3_vl_moe":
        return t.Qwen3VLMoeTextConfig(
            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8, **_COMMON
        )  # fmt: skip
    if family == "qwen3_5_moe":
        return t.Qwen3_5MoeTextConfig(
            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"], **_COMMON,
        )  # fmt: skip
    if family == "granitemoehybrid":
        return t.GraniteMoeHybridConfig(
            num_local_experts=6, num_experts_per_tok=2, shared_intermediate_size=40, mamba_n_heads=4, mamba_d_head=16,
            mamba_expand=2, mamba_n_groups=1, mamba_d_state=8, layer_types=["mamba", "attention"], **_COMMON,
        )  # fmt: skip
    if family == "ernie4_5_moe":
        return t.Ernie4_5_MoeConfig(
            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, moe_num_shared_experts=1,
            moe_layer_start_index=1, **_COMMON,
        )  # fmt: skip
    if family == "mellum":
        return t.MellumConfig(
            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False, head_dim=8, **_COMMON
        )
    if family == "minimax_m2":
        return t.MiniMaxM2Config(num_local_experts=6, num_experts_per_tok=2, head_dim=8, **_COMMON)
    if family == "granitemoe_swa":
        return t.GraniteMoeSWAConfig(num_local_experts=6, num_experts_per_tok=2, **_COMMON)
    raise ValueError(f"unknown family {family!r}")


BLOCK_CLASSES = {
    "mixtral": ("mixtral", "MixtralSparseMoeBlock"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": ("olmoe", "OlmoeSparseMoeBlock"),
    "olmoe_norm": ("olmoe", "OlmoeSparseMoeBlock"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Moe"),
    "deepseek_v2_group": ("deepseek_v2", "DeepseekV2Moe"),
    "glm4_moe": ("glm4_moe", "Glm4MoeMoE"),
    "dots1": ("dots1", "Dots1MoE"),
    "minimax": ("minimax", "MiniMaxSparseMoeBlock"),
    "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock"),
    "jamba": ("jamba", "JambaSparseMoeBlock"),
    "granitemoe": ("granitemoe", "GraniteMoeMoE"),
    "granitemoeshared": ("granitemoeshared", "GraniteMoeSharedMoE"),
    "phimoe": ("phimoe", "PhimoeSparseMoeBlock"),
    "gpt_oss": ("gpt_oss", "GptOssMLP"),
    "exaone_moe": ("exaone_moe", "ExaoneMoeSparseMoEBlock"),
    "minicpm5_moe": ("minicpm5_moe", "MiniCPM5MoeMoE"),
    "solar_open": ("solar_open", "SolarOpenMoE"),
    "mellum": ("mellum", "MellumSparseMoeBlock"),
    "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock"),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridMoE"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock"),
    "minimax_m2": ("minimax_m2", "MiniMaxM2SparseMoeBlock"),
    "granitemoe_swa": ("granitemoe_swa", "GraniteMoeSWAMoE"),
}

FAMILIES = tuple(BLOCK_CLASSES)


def block_class(family: str) -> Any:
    module, name = BLOCK_CLASSES[family]
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    if not hasattr(modeling, name) and name == "DeepseekV2Moe":
        name = "DeepseekV2MoE"  # its 4.57 spelling
    return getattr(modeling, name)


def block_output(out: Any) -> torch.Tensor:
    """The hidden states of an HF block's forward (4.57's Mixtral/Qwen/OLMoE also return router logits)."""
    return out[0] if isinstance(out, tuple) else out


def hf_routing(block: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights [T, K], expert ids [T, K]) of the block's own router, or None where the gate is a
    plain Linear (4.57's Mixtral/Qwen/OLMoE: the top-k happens inside the block's forward)."""
    if TRANSFORMERS_5:
        from moe.integrations.hf_families import spec_for

        spec = spec_for(block)
        gate = getattr(block, spec.router_attr)  # "gate" or "router" (Granite)
        extra = (block.e_score_correction_bias,) if spec.bias_holder == "" else ()  # MiniMax-M2: the block's bias
        _, weights, ids = gate(x_TD, *extra)
        return weights, ids
    gate = block.gate
    if isinstance(gate, nn.Linear):
        return None
    ids, weights = gate(x_TD.unsqueeze(0) if type(gate).__name__ == "DeepseekV2MoEGate" else x_TD)
    return weights, ids


def expert_tensors(block: nn.Module, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's expert weights (or their gradients) in the 5.x fused layout, for either layout:
    (gate_up [E, 2I, D] with the gate rows first, down [E, D, I])."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        fused = (experts.gate_up_proj, experts.down_proj)
        return (fused[0].grad, fused[1].grad) if grad else (fused[0], fused[1])
    names = ("w1", "w3", "w2") if hasattr(experts[0], "w1") else ("gate_proj", "up_proj", "down_proj")

    def get(expert: nn.Module, name: str) -> torch.Tensor:
        weight = getattr(expert, name).weight
        if not grad:
            return weight
        return torch.zeros_like(weight) if weight.grad is None else weight.grad  # 4.57 skips idle experts

    gate_up = torch.stack([torch.cat([get(e, names[0]), get(e, names[1])]) for e in experts])
    return gate_up, torch.stack([get(e, names[2]) for e in experts])
