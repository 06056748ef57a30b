"""The router seam: route(x_TD) -> Routing, and probe(x_TD) -> (probs, ids) without side effects.

Routers own their math and their state (aux-free bias, the recurrent GRU). They know nothing
about devices or ranks, beyond an optional data-parallel group for load counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

__all__ = ["Routing", "Router", "masked_mean"]


@dataclass
class Routing:
    """The decision of a router for T tokens.

    Attributes:
        expert_ids: [T, K] int64 expert of each slot; -1 = no expert (dropped or unused slot).
        weights: [T, K] fp32 gate weight of each slot; 0 where expert_ids == -1.
        aux_losses: losses already multiplied by their coefficients, by name.
        probs: [T, E] fp32 router probabilities (used for statistics and prediction), or None.
        max_copies: static upper bound on the number of routed copies (T * K for token-choice
            routers, E * C for expert choice); the dispatcher keeps shapes static with it.
            Default (-1): T * K.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    probs: torch.Tensor | None = None
    max_copies: int = -1

    def __post_init__(self) -> None:
        if self.max_copies < 0:
            self.max_copies = self.expert_ids.numel()

    def check(self, num_tokens: int, num_experts: int, values: bool = True) -> None:
        """ValueError/TypeError naming what is wrong unless this is a valid routing of num_tokens
        tokens over num_experts experts. values=True also checks the ids' range (a host sync)."""
        ids, w = self.expert_ids, self.weights
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"Routing.expert_ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
        if ids.dim() != 2 or ids.shape[0] != num_tokens:
            raise ValueError(f"Routing.expert_ids must be [T={num_tokens}, K], got shape {tuple(ids.shape)}")
        if not isinstance(w, torch.Tensor) or w.shape != ids.shape or not w.is_floating_point():
            raise ValueError(
                f"Routing.weights must be a float tensor shaped like expert_ids {tuple(ids.shape)}, "
                f"got {getattr(w, 'dtype', type(w))} {tuple(getattr(w, 'shape', ()))}"
            )
        if num_tokens and self.max_copies < 1:
            raise ValueError(f"Routing.max_copies must be >= 1 for {num_tokens} tokens, got {self.max_copies}")
        if values and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"Routing.expert_ids must be in [-1, {num_experts}), got values in [{lo}, {hi}]")


class Router(nn.Module):
    """Base class of routers. Subclasses implement forward and probe, and may override update.

    forward(x_TD, token_mask=None, seq_len=None) -> Routing
        x_TD: [T, D] tokens (any float dtype; routing math runs in fp32).
        token_mask: [T] bool, False for padding tokens, which are still routed but excluded
            from aux losses, statistics and load counts.
        seq_len: tokens per sequence when the input was [..., S, D] (sequence-wise losses).
    probe(x_TD) -> (probs [T, E] fp32, ids [T, K] int64)
        The routing forward would give in eval mode, without side effects (see probe).

    Attributes:
        probe_standalone: True when probe reads nothing but its input and the router's own
            parameters and buffers, so it can score any hidden state (the offload forecaster
            applies later layers' routers to the current input). False for routers whose probe
            reads state carried between layers (the recurrent router's chain).
    """

    num_experts: int
    top_k: int
    probe_standalone: ClassVar[bool] = True

    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E] fp32, ids [T, K] int64) that forward(x_TD) would return in eval mode.

        Side-effect free: no aux losses, no load counts or bias updates, no statistics, no RNG
        draws (no jitter), no autograd graph, and no change to any buffer or carried state.
        probs equals Routing.probs and ids Routing.expert_ids of that forward (-1 = unused slot).

        Raises:
            NotImplementedError: the router does not implement it (a custom router); callers
                such as the offload forecaster then warn and do without a prediction.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement Router.probe(x_TD) -> (probs [T, E], ids [T, K]); "
            "implement it (side-effect free: the routing forward gives in eval mode) to enable prediction"
        )

    @classmethod
    def probe_many(cls, routers: list[Router], x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probe of several routers of this class (same E and K) on one input, stacked:
        (probs [T, A, E], ids [T, A, K]) for A routers. Subclasses may batch the math (top-k does)."""
        probes = [r.probe(x_TD) for r in routers]
        return torch.stack([p for p, _ in probes], 1), torch.stack([i for _, i in probes], 1)

    def update(self) -> None:
        """Called by moe.update_routers(model) after optimizer.step(); no-op by default."""


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of values [T, ...] counting only tokens where token_mask is True.

    Returns zeros (not NaN) when no token counts, so an empty batch adds nothing to a loss.
    """
    if token_mask is None:
        return values.sum(0) / max(values.shape[0], 1)
    m = token_mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * m).sum(0) / m.sum().clamp(min=1)
