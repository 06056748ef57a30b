"""Tiny random Hugging Face MoE configs (no hub downloads) shared by the HF oracle and patch tests."""

from __future__ import annotations

from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

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
}

FAMILIES = tuple(BLOCK_CLASSES)


def block_class(family: str) -> Any:
    module, name = BLOCK_CLASSES[family]
    modeling = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
    return getattr(modeling, name)
