"""LoRA-MoE fine-tuning: MoLA layer-wise allocation, DynMoLE routing, MoS shards, save/load.

moe.lora.apply_lora_moe(model, ["q_proj", "v_proj"], config=moe.lora.LoRAMoEConfig(
    experts_per_layer="2-4-6-8", rank=8, alpha=16, router="topk" | "dynmole" | "mos", top_k=2))
loss = lm_loss + moe.aux_loss(model)
moe.lora.save_lora_moe(model, "adapter.safetensors")
moe.lora.load_lora_moe(fresh_base_model, "adapter.safetensors")
moe.lora.merge_lora_moe(model)   # plain LoRA (one expert) and MoS folded into the weights
"""

from moe.lora.adapter_checkpoint import adapter_state_dict, load_lora_moe, read_metadata, save_lora_moe
from moe.lora.allocation import experts_per_layer, find_targets, layer_index
from moe.lora.apply import adapter_modules, apply_lora_moe
from moe.lora.config import LoRAMoEConfig
from moe.lora.dynmole import (
    DynMoLERouter,
    dynmole_select,
    max_tsallis_entropy,
    normalized_tsallis_entropy,
    tsallis_entropy,
)
from moe.lora.linear import LoRAMoELinear, lora_experts_dense, lora_experts_grouped
from moe.lora.merge import merge_lora_moe, routed_adapters
from moe.lora.mos import MoSLinear, MoSPool


def trainable_parameters(model) -> int:  # type: ignore[no-untyped-def]
    """Number of parameters with requires_grad (shared pools counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "apply_lora_moe",
    "LoRAMoEConfig",
    "save_lora_moe",
    "load_lora_moe",
    "read_metadata",
    "adapter_state_dict",
    "adapter_modules",
    "merge_lora_moe",
    "routed_adapters",
    "trainable_parameters",
    "experts_per_layer",
    "find_targets",
    "layer_index",
    "LoRAMoELinear",
    "MoSLinear",
    "MoSPool",
    "DynMoLERouter",
    "dynmole_select",
    "tsallis_entropy",
    "max_tsallis_entropy",
    "normalized_tsallis_entropy",
    "lora_experts_dense",
    "lora_experts_grouped",
]
