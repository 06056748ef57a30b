"""MoS (Mixture of Shards): LoRA matrices assembled from shard pools shared across layers.

Shape legend: T = tokens, D = in_features, N = out_features, R = rank, L = shards per rank
vector ("vector sharding"), P = public pool size, Q = private shards per layer.

Every rank vector of A (length D) and of B (length N) is the concatenation of L shards
(length D/L resp. N/L). All layers that adapt the same projection type (the module-name
suffix, e.g. "q_proj") share one public pool of shards per side; each layer owns Q private
shards per side ("shard privatization") and picks, per side independently ("pair
dissociation"), which pool shards fill its R*L slots ("subset selection"). The choice is a
fixed random index (index routing, no learned router), drawn once at apply time and saved in
the checkpoint as an int64 buffer.

    A_RD = cat(pool_A, private_A)[index_A].reshape(R, D)
    Bt_RN = cat(pool_B, private_B)[index_B].reshape(R, N)       (B transposed)
    y = base(x) + (alpha / R) * (x A^T) Bt

B shards start at zero, so at init the wrapped layer returns exactly the base output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["MoSPool", "draw_index", "MoSLinear"]


class MoSPool(nn.Module):
    """The public shard pools of one projection type (shared by all its layers).

    Attributes:
        shards_A: [P, D / L] shards of A's rank vectors.
        shards_B: [P, N / L] shards of B's rank vectors (zeros at init).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        pool_size: int,
        shards_per_vector: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, dim in (("in_features", in_features), ("out_features", out_features)):
            if dim % shards_per_vector != 0:
                raise ValueError(
                    f"MoS needs {name} ({dim}) divisible by shards_per_vector ({shards_per_vector}); "
                    "pick a shards_per_vector that divides both dimensions"
                )
        self.in_features, self.out_features = in_features, out_features
        self.pool_size, self.shards_per_vector = pool_size, shards_per_vector
        bound = 1.0 / math.sqrt(in_features)
        shard_a, shard_b = in_features // shards_per_vector, out_features // shards_per_vector
        self.shards_A = nn.Parameter(
            torch.empty(pool_size, shard_a, device=device, dtype=dtype).uniform_(-bound, bound)
        )
        self.shards_B = nn.Parameter(torch.zeros(pool_size, shard_b, device=device, dtype=dtype))

    def spec(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this pool (saved in adapter checkpoint metadata)."""
        return dict(
            in_features=self.in_features,
            out_features=self.out_features,
            pool_size=self.pool_size,
            shards_per_vector=self.shards_per_vector,
        )


def draw_index(pool_size: int, private: int, slots: int, generator: torch.Generator) -> torch.Tensor:
    """Slot -> shard index [slots] into cat(pool, private): every private shard used once,
    the other slots filled with distinct pool shards (with repetition only if the pool is small)."""
    public = slots - private
    if public <= pool_size:
        chosen = torch.randperm(pool_size, generator=generator)[:public]
    else:
        chosen = torch.randint(pool_size, (public,), generator=generator)
    index = torch.cat([chosen, pool_size + torch.arange(private)])
    return index[torch.randperm(slots, generator=generator)]


class MoSLinear(nn.Module):
    """Frozen base nn.Linear + a LoRA whose A and B are assembled from shared shard pools.

    Args:
        base: the nn.Linear to adapt.
        pool: the MoSPool of this projection type (not registered as a submodule here: it
            lives once on the model root, see apply_lora_moe).
        rank: R; alpha: scaling = alpha / R.
        private_shards: Q private shards per side (<= R * L).
        generator: draws the slot indices.

    Attributes:
        private_A [Q, D / L], private_B [Q, N / L]; buffers index_A, index_B [R * L] int64.
    """

    index_A: torch.Tensor
    index_B: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        pool: MoSPool,
        pool_name: str,
        rank: int,
        alpha: float,
        private_shards: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoSLinear wraps nn.Linear, got {type(base).__name__}")
        if (base.in_features, base.out_features) != (pool.in_features, pool.out_features):
            raise ValueError(
                f"the MoS pool '{pool_name}' is for Linear({pool.in_features}, {pool.out_features}) but this layer "
                f"is Linear({base.in_features}, {base.out_features}); layers sharing a module-name suffix must have "
                "equal shapes"
            )
        slots = rank * pool.shards_per_vector
        if not 0 <= private_shards <= slots:
            raise ValueError(f"private_shards must be in [0, rank * shards_per_vector = {slots}], got {private_shards}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pool_name, self.rank, self.alpha = pool_name, rank, float(alpha)
        self.scaling = self.alpha / rank
        self.private_shards = private_shards
        object.__setattr__(self, "pool", pool)  # shared: registered once on the model root
        factory: dict[str, Any] = dict(device=base.weight.device, dtype=base.weight.dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        shard_a, shard_b = pool.shards_A.shape[1], pool.shards_B.shape[1]
        self.private_A = nn.Parameter(torch.empty(private_shards, shard_a, **factory).uniform_(-bound, bound))
        self.private_B = nn.Parameter(torch.zeros(private_shards, shard_b, **factory))
        device = base.weight.device
        self.register_buffer("index_A", draw_index(pool.pool_size, private_shards, slots, generator).to(device))
        self.register_buffer("index_B", draw_index(pool.pool_size, private_shards, slots, generator).to(device))
        self.aux_losses: dict[str, torch.Tensor] = {}

    def spec(self) -> dict[str, Any]:
        """The arguments that rebuild this adapter (saved in adapter checkpoint metadata)."""
        return dict(
            kind="mos",
            in_features=self.in_features,
            out_features=self.out_features,
            pool=self.pool_name,
            rank=self.rank,
            alpha=self.alpha,
            private_shards=self.private_shards,
        )

    def lora_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_RD [R, D], Bt_RN [R, N]) assembled from the shards."""
        pool: MoSPool = self.pool  # type: ignore[assignment]
        # The shared pool lives on one device; a layer placed elsewhere (device_map="auto") takes a
        # copy (differentiable: the pool's gradient still arrives on its own device).
        dev = self.private_A.device
        a_RD = torch.cat([pool.shards_A.to(dev), self.private_A])[self.index_A].reshape(self.rank, self.in_features)
        bt_RN = torch.cat([pool.shards_B.to(dev), self.private_B])[self.index_B].reshape(self.rank, self.out_features)
        return a_RD, bt_RN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., N]: base(x) + scaling * (x A^T) Bt."""
        a_RD, bt_RN = self.lora_matrices()
        return self.base(x) + (x @ a_RD.t()) @ bt_RN * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pool={self.pool_name}, rank={self.rank}"
