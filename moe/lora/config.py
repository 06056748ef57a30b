"""LoRAMoEConfig: the options of `moe.lora.apply_lora_moe`, frozen and validated like moe.config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moe.config import BACKENDS, Backend

LoRARouter = Literal["topk", "dynmole", "mos"]
Compute = Literal["auto", "dense", "grouped"]
LORA_ROUTERS = ("topk", "dynmole", "mos")
COMPUTES = ("auto", "dense", "grouped")

__all__ = ["LoRAMoEConfig", "LoRARouter", "Compute", "LORA_ROUTERS", "COMPUTES"]


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LoRAMoEConfig:
    """How `apply_lora_moe(model, targets, config=LoRAMoEConfig(...))` adapts each targeted Linear.

    Attributes:
        experts_per_layer: MoLA allocation: an int, a string like "2-4-6-8" (contiguous layer
            groups, the first gets 2 experts per adapted linear, the last 8), or a per-layer
            tuple. Ignored by router="mos".
        rank, alpha: LoRA rank and alpha (scaling alpha / rank) of every expert.
        router: "topk" (MoLA: softmax, top-k renormalised), "dynmole" (Tsallis hybrid) or
            "mos" (Mixture of Shards: one sharded LoRA per layer, pools shared across layers).
        top_k: experts per token for "topk".
        balance_coef: balance-loss weight (None: topk 0 = off, dynmole 1e-3).
        entropy_coef: DynMoLE's Tsallis loss weight.
        num_layers: transformer layers (None: model.config.num_hidden_layers, else 1 + the
            largest layer index among the targets).
        compute: "auto" | "dense" | "grouped" batched expert computation (see moe.lora.linear).
        backend: op backend of the grouped path.
        freeze_base: set requires_grad False on every parameter already in the model.
        mos_shards_per_vector: shards per rank vector (divides in and out features).
        mos_private_shards: private shards per layer and side.
        mos_compression: target ratio of LoRA parameters (at this rank) to MoS parameters.
        seed: seeds MoS's shard selection.
    """

    experts_per_layer: int | str | tuple[int, ...] = 1
    rank: int = 8
    alpha: float = 16.0
    router: LoRARouter = "topk"
    top_k: int = 2
    balance_coef: float | None = None
    entropy_coef: float = 0.01
    num_layers: int | None = None
    compute: Compute = "auto"
    backend: Backend = "auto"
    freeze_base: bool = True
    mos_shards_per_vector: int = 2
    mos_private_shards: int = 1
    mos_compression: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.router not in LORA_ROUTERS:
            raise ValueError(f"router must be 'topk', 'dynmole' or 'mos', got {self.router!r}")
        _int_at_least("rank", self.rank, 1)
        _int_at_least("top_k", self.top_k, 1)
        if self.num_layers is not None:
            _int_at_least("num_layers", self.num_layers, 1)
        _int_at_least("mos_shards_per_vector", self.mos_shards_per_vector, 1)
        _int_at_least("mos_private_shards", self.mos_private_shards, 0)
        for name in ("alpha", "mos_compression"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.balance_coef is not None and not self.balance_coef >= 0:
            raise ValueError(f"balance_coef must be None (the router's default) or >= 0, got {self.balance_coef}")
        if not self.entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute must be 'auto', 'dense' or 'grouped', got {self.compute!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        allocation = self.experts_per_layer
        if isinstance(allocation, Sequence) and not isinstance(allocation, (str, tuple)):
            object.__setattr__(self, "experts_per_layer", allocation := tuple(allocation))  # hashable
        if not isinstance(allocation, (int, str)) and not (
            isinstance(allocation, tuple) and all(isinstance(c, int) for c in allocation)
        ):
            raise TypeError(
                f"experts_per_layer must be an int, a string like '2-4-6-8' or a list of ints, got {allocation!r}"
            )
