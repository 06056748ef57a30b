"""Layout-independent checkpoints: experts saved one tensor pair per global expert id.

File format (safetensors): every non-expert parameter/buffer under its state_dict key, and for
each expert module `<m>` (moe.experts.Experts or moe.parallel.ParallelExperts) and each global
expert e: `<m>.<e>.w_in` [D, F] and `<m>.<e>.w_out` [H, D]. A model saved with any expert-parallel
size (or none) loads into any other: each rank reads only the experts it stores.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe.experts import Experts
from moe.parallel.sharded_experts import ParallelExperts

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint"]


FORMAT = "moe.global_experts.v1"


def _expert_modules(model: nn.Module) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (Experts, ParallelExperts))]


def _expert_keys(modules: list[tuple[str, Any]]) -> set[str]:
    return {f"{name}.{w}" if name else w for name, _ in modules for w in ("w_in", "w_out")}


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves model to one safetensors file with experts by global id.

    Collective when the model has expert-parallel layers: every rank of their process group must
    call it; that group's rank 0 writes (so each of several expert-parallel groups, e.g. pipeline
    stages, writes its own file).
    """
    modules = _expert_modules(model)
    skip = _expert_keys(modules)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().cpu().clone().contiguous()
    parallel, group = False, None
    for name, m in modules:
        prefix = f"{name}." if name else ""
        if isinstance(m, ParallelExperts):
            if not parallel:  # the first expert-parallel layer's group writes and barriers
                parallel, group = True, m.group
            w_in, w_out = m.global_weights()
        else:
            w_in, w_out = m.w_in.detach(), m.w_out.detach()
        for e in range(w_in.shape[0]):
            tensors[f"{prefix}{e}.w_in"] = w_in[e].cpu().clone().contiguous()
            tensors[f"{prefix}{e}.w_out"] = w_out[e].cpu().clone().contiguous()
    collective = parallel and dist.is_initialized()
    if not collective or dist.get_rank(group) == 0:
        # Written whole, then renamed: a model with no expert-parallel layer may be saved by every
        # rank to one path (no collective is assumed), and a reader never sees a partial file.
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, path)
    if collective:
        dist.barrier(group=group)


@torch.no_grad()
def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Loads a save_checkpoint file into model, whatever its expert-parallel size.

    Raises:
        ValueError: the file is not in this format, or (strict) keys are missing or unexpected.
    """
    modules = _expert_modules(model)
    skip = _expert_keys(modules)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a moe.parallel checkpoint (format {meta.get('format')!r}, want {FORMAT!r})"
            )
        keys = set(f.keys())
        used: set[str] = set()
        for name, m in modules:
            prefix = f"{name}." if name else ""
            first = m.stored.first_expert if isinstance(m, ParallelExperts) else 0
            count = m.stored.num_experts if isinstance(m, ParallelExperts) else m.num_experts
            ids = range(first, first + count)
            saved = {k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix) and k.endswith(".w_in")}
            saved_count = sum(part.isdigit() for part in saved)
            if saved_count != m.num_experts:  # e.g. a pyramid saved with other per-layer expert counts
                raise ValueError(
                    f"{path} holds {saved_count} experts for {name or 'the model'}, the model has {m.num_experts}"
                )
            missing = [f"{prefix}{e}.w_in" for e in ids if f"{prefix}{e}.w_in" not in keys]
            if missing:
                raise ValueError(f"{path} lacks experts of {name or 'the model'}: {missing[:4]}")
            w_in = torch.stack([f.get_tensor(f"{prefix}{e}.w_in") for e in ids])
            w_out = torch.stack([f.get_tensor(f"{prefix}{e}.w_out") for e in ids])
            if isinstance(m, ParallelExperts):
                m.load_global(w_in, w_out, first)
            else:
                if w_in.shape != m.w_in.shape or w_out.shape != m.w_out.shape:
                    raise ValueError(
                        f"{name}: checkpoint experts are {tuple(w_in.shape)}/{tuple(w_out.shape)}, "
                        f"the model's {tuple(m.w_in.shape)}/{tuple(m.w_out.shape)}"
                    )
                m.w_in.copy_(w_in)
                m.w_out.copy_(w_out)
            used |= {k for k in keys if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()}
        rest = {k: f.get_tensor(k) for k in keys - used}
    result = model.load_state_dict(rest, strict=False)
    missing_keys = [k for k in result.missing_keys if k not in skip]
    if strict and (missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint mismatch: missing {missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
