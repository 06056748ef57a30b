"""The one parameter layout behind every parallel mode (Tutel's zero-cost switching).

Every expert is a list of H hidden units; unit (e, h) owns column h of the gate projection,
column h of the up projection (SwiGLU) and row h of the down projection. Global unit
u = e * H + h. Rank p always stores units [p * U, (p + 1) * U), U = E * H / W: whole experts
[p * E / W, (p + 1) * E / W) when W <= E, a hidden-dim slice of expert p // (W / E) when W > E.

A mode r only changes which units a rank *computes with*, never what it stores:
    r = 0: data parallel: every rank uses all units (all-gathered; gradients reduce-scattered).
    r = 1: expert parallel: rank p uses exactly what it stores (needs W <= E).
    r > 1: expert parallel with each expert's hidden dim sharded over r ranks: ranks
           [j * r, (j + 1) * r) serve experts [j * E_b, (j + 1) * E_b), E_b = E * r / W, and
           member m uses hidden slice m (H / r units) of each; tokens go to all r members and
           their partial outputs are summed in the combine.
Units a rank needs but does not store arrive by one differentiable all_to_all_single, whose
backward sums the gradients back onto the owners.

Shape legend: E experts, D dim, H hidden, F = 2H (SwiGLU) or H, W ranks, U units per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe.parallel.alltoall import all_to_all

__all__ = [
    "valid_modes",
    "check_layout",
    "UnitSet",
    "stored_units",
    "needed_units",
    "to_units",
    "from_units",
    "UnitExchange",
]


def valid_modes(num_experts: int, hidden_dim: int, world: int) -> list[int]:
    """The shard degrees r usable with this layout: 0 (data parallel) and every valid r >= 1."""
    modes = [0]
    for r in range(1, world + 1):
        if world % r == 0 and (num_experts * r) % world == 0 and num_experts * r >= world and hidden_dim % r == 0:
            modes.append(r)
    return modes


def check_layout(num_experts: int, hidden_dim: int, world: int) -> None:
    """Raises ValueError unless the E * H units split evenly over W ranks on expert/hidden borders."""
    if num_experts % world == 0:
        return
    if world % num_experts == 0 and hidden_dim % (world // num_experts) == 0:
        return
    raise ValueError(
        f"expert parallelism needs num_experts ({num_experts}) divisible by the world size ({world}), or the "
        f"world size divisible by num_experts with hidden_dim ({hidden_dim}) divisible by world/num_experts; "
        "change num_experts or the number of ranks"
    )


@dataclass(frozen=True)
class UnitSet:
    """The units a rank computes with in one mode: experts [first, first + E_b), hidden slice."""

    first_expert: int
    num_experts: int  # E_b
    first_unit: int  # first hidden index h within each expert
    num_units: int  # H_b

    def unit_ids(self, hidden_dim: int) -> torch.Tensor:
        """[E_b * H_b] global unit ids in (expert, hidden) order."""
        e = torch.arange(self.first_expert, self.first_expert + self.num_experts)
        h = torch.arange(self.first_unit, self.first_unit + self.num_units)
        return (e[:, None] * hidden_dim + h[None, :]).reshape(-1)


def stored_units(num_experts: int, hidden_dim: int, world: int, rank: int) -> UnitSet:
    """What rank `rank` stores (identical in every mode)."""
    if num_experts >= world:
        per = num_experts // world
        return UnitSet(rank * per, per, 0, hidden_dim)
    share = world // num_experts
    part = hidden_dim // share
    return UnitSet(rank // share, 1, (rank % share) * part, part)


def needed_units(num_experts: int, hidden_dim: int, world: int, rank: int, mode: int) -> UnitSet:
    """What rank `rank` computes with in mode r (see the module docstring)."""
    if mode == 0:
        return UnitSet(0, num_experts, 0, hidden_dim)
    block, member = divmod(rank, mode)
    per = num_experts * mode // world
    part = hidden_dim // mode
    return UnitSet(block * per, per, member * part, part)


def to_units(w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor, swiglu: bool) -> torch.Tensor:
    """[E, D, F], [E, H, D] -> [E * H, P] unit rows, P = 3D (gate, up, down) or 2D (up, down)."""
    e, h, d = w_out_EHD.shape
    cols = [w_in_EDF[:, :, :h], w_in_EDF[:, :, h:]] if swiglu else [w_in_EDF]
    parts = [c.transpose(1, 2) for c in cols] + [w_out_EHD]
    return torch.cat(parts, dim=-1).reshape(e * h, -1)


def from_units(units_UP: torch.Tensor, num_experts: int, swiglu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of to_units: [E * H, P] -> (w_in [E, D, F], w_out [E, H, D])."""
    k = 3 if swiglu else 2
    d = units_UP.shape[1] // k
    u = units_UP.reshape(num_experts, -1, k, d)
    w_in = torch.cat([u[:, :, i, :].transpose(1, 2) for i in range(k - 1)], dim=-1)
    return w_in, u[:, :, k - 1, :]


class UnitExchange:
    """The static send/receive plan that brings a rank the units of one mode.

    Built once per (layout, mode) from shapes only; identical on all ranks by construction.
    """

    def __init__(self, num_experts: int, hidden_dim: int, world: int, rank: int, mode: int) -> None:
        mine = stored_units(num_experts, hidden_dim, world, rank)
        self.needed = needed_units(num_experts, hidden_dim, world, rank, mode)
        per_rank = num_experts * hidden_dim // world
        base = mine.unit_ids(hidden_dim)
        self.local = bool(torch.equal(base, self.needed.unit_ids(hidden_dim)))
        position = torch.full((num_experts * hidden_dim,), -1, dtype=torch.int64)
        position[base] = torch.arange(base.numel())
        send, self.in_splits, self.out_splits = [], [], []
        my_needs = self.needed.unit_ids(hidden_dim)
        for q in range(world):
            theirs = needed_units(num_experts, hidden_dim, world, q, mode).unit_ids(hidden_dim)
            ours = position[theirs]
            ours = ours[ours >= 0]
            send.append(ours)
            self.in_splits.append(int(ours.numel()))
            self.out_splits.append(int(((my_needs // per_rank) == q).sum()))
        self.send_idx = torch.cat(send)

    def gather(
        self, w_in: torch.Tensor, w_out: torch.Tensor, swiglu: bool, group: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local shards -> (w_in [E_b, D, F_b], w_out [E_b, H_b, D]) of this mode (differentiable)."""
        if self.local:
            return w_in, w_out
        units = to_units(w_in, w_out, swiglu)
        got = all_to_all(units.index_select(0, self.send_idx.to(units.device)), self.in_splits, self.out_splits, group)
        return from_units(got, self.needed.num_experts, swiglu)
