"""merge_lora_moe: fold the adapters that are one fixed weight change back into their nn.Linear.

    n = moe.lora.merge_lora_moe(model)   # every adapter gone, its base Linear holds W + delta

What folds exactly (the adapted layer is then a plain Linear with the same outputs):
    LoRAMoELinear with one expert (plain LoRA):  W [N, D] += scaling * (A_0 B_0)^T
    MoSLinear (its A, B assembled from shards):  W += scaling * (A^T Bt)^T
What does not: a LoRAMoELinear with E > 1 experts routes each token to its own mixture of LoRA
experts, so its weight change depends on the input and no single W reproduces it. Such a model
keeps its adapter file (save_lora_moe) next to the unchanged base checkpoint (load_lora_moe).
"""

from __future__ import annotations

import torch
from torch import nn

from moe.lora.apply import POOLS_ATTR, adapter_modules, replace_module
from moe.lora.linear import LoRAMoELinear
from moe.lora.mos import MoSLinear

__all__ = ["merge_lora_moe", "routed_adapters"]


def routed_adapters(model: nn.Module) -> list[str]:
    """Paths of the adapters that cannot be folded into a weight (LoRA-MoE with more than one expert)."""
    return [p for p, m in adapter_modules(model).items() if isinstance(m, LoRAMoELinear) and m.num_experts > 1]


def _delta_weight(adapter: nn.Module) -> torch.Tensor:
    """The adapter's weight change [N, D] in the layout of nn.Linear.weight, in fp32."""
    if isinstance(adapter, MoSLinear):
        a_RD, bt_RN = adapter.lora_matrices()
        return adapter.scaling * (bt_RN.float().t() @ a_RD.float())
    assert isinstance(adapter, LoRAMoELinear) and adapter.num_experts == 1
    return adapter.scaling * (adapter.lora_A[0].float() @ adapter.lora_B[0].float()).t()


@torch.no_grad()
def merge_lora_moe(model: nn.Module) -> int:
    """Replaces every LoRA-MoE / MoS adapter of `model` by its base nn.Linear with the adapter folded
    into the weight (in place; the MoS shard pools are removed). Returns the number merged.

    Raises:
        ValueError: some adapter is a routed mixture (E > 1 LoRA experts): it depends on the input and
            cannot be folded. Nothing is changed then.
    """
    routed = routed_adapters(model)
    if routed:
        raise ValueError(
            f"cannot merge {len(routed)} routed LoRA-MoE adapter(s), e.g. {routed[:3]}: with more than one "
            "LoRA expert per layer the weight change depends on each token's routing, so no single weight "
            "reproduces it. Keep the adapter as a file (moe.lora.save_lora_moe) beside the base checkpoint "
            "(the base is unchanged when frozen) and load it with moe.lora.load_lora_moe"
        )
    adapters = adapter_modules(model)
    for path, adapter in adapters.items():
        base: nn.Linear = adapter.base  # type: ignore[assignment]
        base.weight.data = (base.weight.float() + _delta_weight(adapter)).to(base.weight.dtype)
        replace_module(model, path, base)
    if hasattr(model, POOLS_ATTR):
        delattr(model, POOLS_ATTR)
    return len(adapters)
