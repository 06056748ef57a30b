"""Adapter-only checkpoints in safetensors (never pickle), rebuilt from their metadata.

The file holds only adapter tensors (LoRA A/B, routers, MoS pools, private shards and shard
indices) under their paths in the model, and in its metadata:
    "format": "moe.lora/1"
    "modules": JSON {module path: spec} (kind, shapes, experts, rank, alpha, router, top_k, ...)
    "pools": JSON {projection type: MoS pool spec}
    "experts_per_layer": JSON {module path: experts} (the allocation as applied)
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe.lora.apply import POOLS_ATTR, adapter_modules, get_pools, wrap_from_spec
from moe.lora.mos import MoSPool

__all__ = ["FORMAT", "adapter_state_dict", "save_lora_moe", "read_metadata", "load_lora_moe"]


FORMAT = "moe.lora/1"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every adapter tensor: wrapped modules minus their frozen base, plus pools."""
    state: dict[str, torch.Tensor] = {}
    for path, module in adapter_modules(model).items():
        for name, tensor in module.state_dict().items():
            if not name.startswith("base."):
                state[f"{path}.{name}"] = tensor
    pools = getattr(model, POOLS_ATTR, None)
    if pools is not None:
        for name, tensor in pools.state_dict().items():
            state[f"{POOLS_ATTR}.{name}"] = tensor
    return state


def save_lora_moe(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Writes the adapter (not the base model) of `model` to a safetensors file.

    Raises:
        ValueError: the model has no LoRA-MoE adapter.
    """
    modules = adapter_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA-MoE adapter to save; call moe.lora.apply_lora_moe first")
    specs = {p: m.spec() for p, m in modules.items()}  # type: ignore[operator]
    pools = getattr(model, POOLS_ATTR, None)
    pool_specs = {n: p.spec() for n, p in pools.items()} if pools is not None else {}
    metadata = {
        "format": FORMAT,
        "modules": json.dumps(specs),
        "pools": json.dumps(pool_specs),
        "experts_per_layer": json.dumps({p: s.get("num_experts", 1) for p, s in specs.items()}),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of an adapter file: format, modules, pools, experts_per_layer."""
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a moe.lora adapter file (format {raw.get('format')!r})")
    return {"format": raw["format"], **{k: json.loads(raw[k]) for k in ("modules", "pools", "experts_per_layer")}}


def load_lora_moe(model: nn.Module, path: str | os.PathLike[str], **options: Any) -> nn.Module:
    """Restores an adapter saved by save_lora_moe.

    On a fresh base model the adapters are first re-applied from the file's metadata (same
    modules, experts, rank, routers, pools); on a model that already has adapters the file
    must describe exactly the same ones. All base parameters are frozen.

    Args:
        model: the base model (or the same model with adapters already applied).
        path: the .safetensors file.
        **options: compute / backend for the re-applied LoRAMoELinear modules.

    Returns:
        The model, with the adapter tensors copied in exactly.

    Raises:
        ValueError: the base model does not match (missing module, shape mismatch) or the
            existing adapters differ from the file's.
    """
    meta = read_metadata(path)
    existing = adapter_modules(model)
    if existing:
        have = {p: m.spec() for p, m in existing.items()}  # type: ignore[operator]
        if have != meta["modules"]:
            diff = sorted(set(have) ^ set(meta["modules"]))
            raise ValueError(
                f"the model's adapters differ from {os.fspath(path)!r} (modules only on one side: {diff[:5]}, "
                "or different settings); load into a fresh base model instead"
            )
    else:
        model.requires_grad_(False)
        pools = get_pools(model) if meta["pools"] else None
        for name, spec in meta["pools"].items():
            assert pools is not None
            pools[name] = MoSPool(
                spec["in_features"], spec["out_features"], spec["pool_size"], spec["shards_per_vector"]
            )
        generator = torch.Generator().manual_seed(0)  # indices are overwritten by the file's
        for module_path, spec in meta["modules"].items():
            wrap_from_spec(model, module_path, spec, generator, **options)
        if pools is not None:  # pools follow the device / dtype of the layers they serve
            for name, pool in pools.items():
                ref = next(m for m in adapter_modules(model).values() if getattr(m, "pool_name", None) == name)
                weight = ref.get_submodule("base").get_parameter("weight")
                pool.to(device=weight.device, dtype=weight.dtype)
    _copy_tensors(model, path)
    return model


def _copy_tensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    target = adapter_state_dict(model)
    with safe_open(os.fspath(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(target) - keys), sorted(keys - set(target))
        if missing or unexpected:
            raise ValueError(
                f"adapter file {os.fspath(path)!r} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key in sorted(keys):
                saved = f.get_tensor(key)
                if saved.shape != target[key].shape:
                    raise ValueError(
                        f"adapter tensor '{key}' has shape {tuple(saved.shape)} in the file but "
                        f"{tuple(target[key].shape)} in the model: the base model does not match"
                    )
                target[key].copy_(saved)
