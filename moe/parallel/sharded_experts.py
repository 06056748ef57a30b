"""This rank's shard of the routed experts, stored in the mode-independent layout.

Parameter names match moe.experts.Experts (w_in, w_out), with local shapes:
    w_in:  [E_loc, D, F_loc]  (F_loc = 2 * H_loc for SwiGLU: [:H_loc] gate, [H_loc:] up)
    w_out: [E_loc, H_loc, D]
E_loc = E / W, H_loc = H when W <= E; E_loc = 1, H_loc = H * E / W otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.experts import ExpertsBase, expert_mlp
from moe.parallel.layout import UnitExchange, check_layout, stored_units

__all__ = ["ParallelExperts"]


class ParallelExperts(ExpertsBase):
    """Routed experts sharded over a process group; computes with the weights of any mode."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str,
        backend: str,
        group: Any,
    ) -> None:
        super().__init__()
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        check_layout(num_experts, hidden_dim, self.world)
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.backend = activation, backend
        self.swiglu = activation == "swiglu"
        self.stored = stored_units(num_experts, hidden_dim, self.world, self.rank)
        e_loc, h_loc = self.stored.num_experts, self.stored.num_units
        self.w_in = nn.Parameter(torch.empty(e_loc, dim, 2 * h_loc if self.swiglu else h_loc))
        self.w_out = nn.Parameter(torch.empty(e_loc, h_loc, dim))
        self._exchanges: dict[int, UnitExchange] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as moe.experts.Experts (nn.Linear's default on the full expert).
        """Initialises this rank's shard as moe.experts.Experts initialises a full expert."""
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def exchange(self, mode: int) -> UnitExchange:
        """The (cached) UnitExchange that all-gathers the units mode `mode` computes with."""
        if mode not in self._exchanges:
            self._exchanges[mode] = UnitExchange(self.num_experts, self.hidden_dim, self.world, self.rank, mode)
        return self._exchanges[mode]

    def weights(self, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E_b, D, F_b], w_out [E_b, H_b, D]) this rank computes with in mode r (collective)."""
        return self.exchange(mode).gather(self.w_in, self.w_out, self.swiglu, self.group)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x_ND [N, D] sorted by local expert, counts_E [E_b] -> [N, D] (partial sums if sharded).

        weights: (w_in, w_out) of the mode the rows were dispatched in (see weights(mode)); None =
        this rank's stored shard (the expert-parallel mode 1 layout).
        """
        w_in, w_out = (self.w_in, self.w_out) if weights is None else weights
        return expert_mlp(x_ND, w_in, w_out, counts_E, self.activation, self.backend)

    @torch.no_grad()
    def load_global(self, w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor, first_expert: int = 0) -> None:
        """Copies this rank's units out of full expert weights [E', D, F], [E', H, D].

        Row i of the inputs is global expert first_expert + i; they must cover this rank's experts.
        """
        s, h = self.stored, self.hidden_dim
        width = 2 * h if self.swiglu else h
        if tuple(w_in_EDF.shape[1:]) != (self.dim, width) or tuple(w_out_EHD.shape[1:]) != (h, self.dim):
            raise ValueError(
                f"expert weights are {tuple(w_in_EDF.shape)} / {tuple(w_out_EHD.shape)} but this layer needs "
                f"[E, {self.dim}, {width}] / [E, {h}, {self.dim}] (dim {self.dim}, hidden {h}, "
                f"{'swiglu' if self.swiglu else 'gelu'})"
            )
        start = s.first_expert - first_expert
        if start < 0 or start + s.num_experts > w_in_EDF.shape[0]:
            raise ValueError(
                f"weights cover experts {first_expert}..{first_expert + w_in_EDF.shape[0] - 1} but rank {self.rank} "
                f"needs {s.first_expert}..{s.first_expert + s.num_experts - 1}"
            )
        experts = slice(start, start + s.num_experts)
        units = slice(s.first_unit, s.first_unit + s.num_units)
        w_in = w_in_EDF[experts]
        cols = [w_in[:, :, units], w_in[:, :, h:][:, :, units]] if self.swiglu else [w_in[:, :, units]]
        self.w_in.copy_(torch.cat(cols, dim=-1))
        self.w_out.copy_(w_out_EHD[experts][:, units])

    @torch.no_grad()
    def global_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full (w_in [E, D, F], w_out [E, H, D]) on every rank (collective: all ranks must call)."""
        return self.weights(0)

    def extra_repr(self) -> str:
        s = self.stored
        return (
            f"experts {s.first_expert}..{s.first_expert + s.num_experts - 1} of {self.num_experts}, "
            f"hidden {s.first_unit}..{s.first_unit + s.num_units - 1} of {self.hidden_dim}, "
            f"rank {self.rank}/{self.world}"
        )
