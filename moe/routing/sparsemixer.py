"""SparseMixer top-2 routing (Phi-3.5-MoE / PhiMoE), inference semantics.

For each of the two picks: take the best remaining logit m, drop every expert whose logit is
further than 2 * jitter_eps below it (relative to max(|logit|, m)), softmax the rest and weight
the pick by its probability. The second pick excludes the first. Gradients flow through those
softmaxes as in Hugging Face's eval-mode sparsemixer.

Training mode (Gumbel sampling with Heun's straight-through multiplier) is random and has a
custom backward; it is not implemented: the router raises in training mode rather than route
differently from the model it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.routing.base import Router, Routing

__all__ = ["SparseMixerConfig", "sparsemixer_eval", "SparseMixerRouter"]


@dataclass(frozen=True, kw_only=True)
class SparseMixerConfig:
    """Attributes:
    jitter_eps: PhiMoE's router_jitter_noise (the relative logit window, 0.01 there).
    routing_dtype: "float32" (default) or "model": logits and the whole sparsemixer in x's dtype,
        as Hugging Face's PhiMoE router computes them (its half-precision routing, bit for bit).
    """

    jitter_eps: float = 0.01
    routing_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.jitter_eps >= 0:
            raise ValueError(f"jitter_eps must be >= 0, got {self.jitter_eps}")
        if self.routing_dtype not in ("float32", "model"):
            raise ValueError(f"routing_dtype must be one of ('float32', 'model'), got {self.routing_dtype!r}")


def _pick(scores_TE: torch.Tensor, masked_TE: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [T, 1], id [T, 1]) of the best entry of masked_TE, weighted within its jitter window."""
    with torch.no_grad():
        threshold, ids = masked_TE.max(dim=-1, keepdim=True)
        factor = scores_TE.abs().clamp(min=threshold)
        outside = ((threshold - scores_TE) / factor) > (2 * jitter_eps)
    gates = torch.softmax(masked_TE.masked_fill(outside, float("-inf")), dim=-1)
    return gates.gather(dim=-1, index=ids), ids


def sparsemixer_eval(scores_TE: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, 2], ids [T, 2]) of HF's sparsemixer(scores, jitter_eps, training=False, top_k=2)."""
    w1, id1 = _pick(scores_TE, scores_TE, jitter_eps)
    masked = torch.scatter(scores_TE, -1, id1, float("-inf"))
    w2, id2 = _pick(scores_TE, masked, jitter_eps)
    return torch.cat((w1, w2), dim=-1), torch.cat((id1, id2), dim=-1)


class SparseMixerRouter(Router):
    """logits = x W^T (W [E, D], no bias) and the sparsemixer top-2 in `logits_dtype` (None: fp32), eval only."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        config: SparseMixerConfig | None = None,
        logits_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if top_k != 2:
            raise ValueError(f"sparsemixer routes to exactly 2 experts, got top_k={top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or SparseMixerConfig()
        self.logits_dtype = logits_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """PhiMoE's sparsemixer top-2 in eval mode (training mode raises NotImplementedError).

        Args:
            x_TD: [T, D] tokens.
            token_mask, seq_len: unused.
        Returns:
            Routing with expert_ids [T, 2], weights [T, 2] fp32, probs [T, E] (softmax of the logits), no losses.
        """
        if self.training:
            raise NotImplementedError(
                "SparseMixerRouter: training-mode sparsemixer (Gumbel sampling with a straight-through "
                "multiplier) is not implemented; call .eval() (inference and eval-mode gradients are exact)"
            )
        model = self.config.routing_dtype == "model"
        dtype = self.logits_dtype or (x_TD.dtype if model else torch.float32)  # HF: all in the model dtype
        logits = x_TD.to(dtype) @ self.weight.to(dtype).t()
        weights, ids = sparsemixer_eval(logits, self.config.jitter_eps)
        return Routing(ids, weights.float(), {}, torch.softmax(logits.float(), dim=-1), x_TD.shape[0] * 2)
