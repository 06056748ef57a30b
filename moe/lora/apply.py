"""apply_lora_moe: wrap the targeted Linear layers of any model with LoRA-MoE adapters."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe.lora.allocation import Allocation, count_layers, find_targets, layer_index
from moe.lora.allocation import experts_per_layer as parse_allocation
from moe.lora.config import LoRAMoEConfig
from moe.lora.linear import LoRAMoELinear
from moe.lora.mos import MoSLinear, MoSPool

__all__ = [
    "POOLS_ATTR",
    "ADAPTER_TYPES",
    "adapter_modules",
    "replace_module",
    "get_pools",
    "wrap_from_spec",
    "mos_pool_size",
    "apply_lora_moe",
]


POOLS_ATTR = "lora_mos_pools"  # the model-root ModuleDict holding MoS's shared pools
ADAPTER_TYPES = (LoRAMoELinear, MoSLinear)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of every LoRAMoELinear / MoSLinear in the model."""
    return {p: m for p, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)}


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replaces the submodule at dotted `path` of `model` by `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def get_pools(model: nn.Module) -> nn.ModuleDict:
    """The model's MoS shard pools (an nn.ModuleDict under POOLS_ATTR), created empty on first use."""
    pools = getattr(model, POOLS_ATTR, None)
    if pools is None:
        pools = nn.ModuleDict()
        model.add_module(POOLS_ATTR, pools)
    return pools


def wrap_from_spec(
    model: nn.Module, path: str, spec: dict[str, Any], generator: torch.Generator, **options: Any
) -> nn.Module:
    """Replaces the Linear at `path` by the adapter described by `spec` (see .spec()).

    Raises:
        ValueError: no module at path, or its shape differs from spec's.
        TypeError: the module is not an nn.Linear.
    """
    try:
        base = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module '{path}' (the adapter was made for a different model)") from None
    if isinstance(base, ADAPTER_TYPES):
        raise ValueError(f"'{path}' already has an adapter; apply to a fresh base model")
    if not isinstance(base, nn.Linear):
        raise TypeError(f"'{path}' is a {type(base).__name__}, not an nn.Linear")
    shape = (base.in_features, base.out_features)
    if shape != (spec["in_features"], spec["out_features"]):
        raise ValueError(
            f"'{path}' is Linear{shape} but the adapter expects "
            f"Linear({spec['in_features']}, {spec['out_features']}): the base model does not match"
        )
    wrapped: nn.Module
    if spec["kind"] == "mos":
        pool = get_pools(model)[spec["pool"]]
        assert isinstance(pool, MoSPool)
        wrapped = MoSLinear(base, pool, spec["pool"], spec["rank"], spec["alpha"], spec["private_shards"], generator)
    else:
        wrapped = LoRAMoELinear(
            base,
            spec["num_experts"],
            spec["rank"],
            spec["alpha"],
            spec["router"],
            spec["top_k"],
            spec["balance_coef"],
            spec["entropy_coef"],
            **options,
        )
    replace_module(model, path, wrapped)
    return wrapped


def mos_pool_size(num_layers: int, slots: int, private: int, compression: float) -> int:
    """Public pool size so that pool + private shards ~ (layers * slots) / compression, and
    at least enough distinct shards to fill one layer's public slots."""
    return max(slots - private, 1, math.ceil(num_layers * slots / compression) - num_layers * private)


def apply_lora_moe(
    model: nn.Module,
    target_modules: str | Sequence[str],
    experts_per_layer: Allocation = 1,
    rank: int = 8,
    alpha: float = 16.0,
    router: str = "topk",
    top_k: int = 2,
    *,
    config: LoRAMoEConfig | None = None,
    balance_coef: float | None = None,
    entropy_coef: float = 0.01,
    num_layers: int | None = None,
    compute: str = "auto",
    backend: str = "auto",
    freeze_base: bool = True,
    mos_shards_per_vector: int = 2,
    mos_private_shards: int = 1,
    mos_compression: float = 8.0,
    seed: int = 0,
) -> nn.Module:
    """Wraps each targeted nn.Linear with a mixture of LoRA experts and its own router.

        apply_lora_moe(model, ["q_proj", "v_proj"], config=LoRAMoEConfig(experts_per_layer="2-4-6-8", rank=8))

    Args:
        model: any nn.Module (a Hugging Face model or plain PyTorch); modified in place.
        target_modules: module-name suffixes, e.g. ["q_proj", "v_proj"] or "gate_proj".
            Layers are identified by the first integer in the module path
            ("model.layers.3.self_attn.q_proj" -> 3).
        config: the adapter options (moe.lora.LoRAMoEConfig, every field documented there).
        experts_per_layer, rank, alpha, router, top_k, balance_coef, entropy_coef, num_layers,
            compute, backend, freeze_base, mos_shards_per_vector, mos_private_shards,
            mos_compression, seed: the same options as keywords (the fields of LoRAMoEConfig);
            give either these or config, not both.

    Returns:
        The same model. Adapter aux losses land in each adapter's `aux_losses` (moe.aux_loss).

    Raises:
        ValueError: no matching module, a bad allocation, or an unknown router.
        TypeError: a matching module is not an nn.Linear, or both config and option keywords.
    """
    options = LoRAMoEConfig(
        experts_per_layer=experts_per_layer,  # type: ignore[arg-type]
        rank=rank,
        alpha=alpha,
        router=router,  # type: ignore[arg-type]
        top_k=top_k,
        balance_coef=balance_coef,
        entropy_coef=entropy_coef,
        num_layers=num_layers,
        compute=compute,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        freeze_base=freeze_base,
        mos_shards_per_vector=mos_shards_per_vector,
        mos_private_shards=mos_private_shards,
        mos_compression=mos_compression,
        seed=seed,
    )
    if config is None:
        config = options
    elif not isinstance(config, LoRAMoEConfig):
        raise TypeError(f"config must be a moe.lora.LoRAMoEConfig, got {type(config).__name__}")
    elif options != LoRAMoEConfig():
        changed = [f.name for f in dataclasses.fields(options) if getattr(options, f.name) != f.default]
        raise TypeError(
            f"pass the adapter options either as config=LoRAMoEConfig(...) or as keywords {changed}, not both"
        )
    return _apply(model, target_modules, config)


def _apply(model: nn.Module, target_modules: str | Sequence[str], c: LoRAMoEConfig) -> nn.Module:
    already = list(adapter_modules(model))
    if already:
        raise ValueError(f"the model already has LoRA-MoE adapters ({already[:3]}); apply once, to a fresh model")
    targets = find_targets(model, target_modules)
    paths = [p for p, _ in targets]
    layers = count_layers(model, paths, c.num_layers)
    counts = parse_allocation(c.experts_per_layer, layers)
    specs = []  # every target checked before the model is touched: an error leaves it as it was
    for path, base in targets:
        layer = layer_index(path)
        if layer is None and len(set(counts)) > 1:
            raise ValueError(f"'{path}' has no layer index in its path, so the layer-wise allocation cannot place it")
        if layer is not None and layer >= layers:
            raise ValueError(f"'{path}' is in layer {layer} but the allocation covers {layers} layers; set num_layers")
        spec: dict[str, Any] = dict(
            in_features=base.in_features, out_features=base.out_features, rank=c.rank, alpha=c.alpha
        )
        if c.router == "mos":
            spec.update(kind="mos", pool=path.rsplit(".", 1)[-1], private_shards=c.mos_private_shards)
        else:
            num_experts = counts[layer if layer is not None else 0]
            spec.update(
                kind="lora_moe",
                num_experts=num_experts,
                router=c.router,
                top_k=min(c.top_k, num_experts),
                balance_coef=c.balance_coef,
                entropy_coef=c.entropy_coef,
            )
        specs.append((path, spec))
    if c.freeze_base:
        model.requires_grad_(False)
    generator = torch.Generator().manual_seed(c.seed)
    if c.router == "mos":
        _make_pools(model, targets, c.rank, c.mos_shards_per_vector, c.mos_private_shards, c.mos_compression)
    for path, spec in specs:
        wrap_from_spec(model, path, spec, generator, compute=c.compute, backend=c.backend)
    return model


def _make_pools(
    model: nn.Module,
    targets: list[tuple[str, nn.Linear]],
    rank: int,
    shards_per_vector: int,
    private: int,
    compression: float,
) -> None:
    by_type: dict[str, list[nn.Linear]] = {}
    for path, base in targets:
        by_type.setdefault(path.rsplit(".", 1)[-1], []).append(base)
    pools = get_pools(model)
    slots = rank * shards_per_vector
    for name, bases in by_type.items():
        first = bases[0]
        size = mos_pool_size(len(bases), slots, private, compression)
        pools[name] = MoSPool(
            first.in_features, first.out_features, size, shards_per_vector, first.weight.device, first.weight.dtype
        )
