"""Expert-choice router (Zhou et al. 2022): experts pick tokens, not tokens experts.

NOT causal: expert e takes the C tokens of the whole batch that score highest for it, so a
token's routing depends on other (including later) tokens. In an autoregressive LM this
leaks future tokens; use it for encoders or analysis, never for causal decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ExpertChoiceConfig
from moe.routing.base import Router, Routing

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """S = softmax(x W^T) [T, E]; expert e keeps its top C = ceil(T * c / E) tokens (C <= T).

    Routing is returned in the common [T, K] form with K = E: slot e of token t holds expert
    e if e chose t, else -1. Padding and non-finite tokens are picked last.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, config: ExpertChoiceConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or ExpertChoiceConfig()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def capacity(self, num_tokens: int) -> int:
        """C: tokens each expert picks from a batch of `num_tokens` (at most num_tokens)."""
        return min(num_tokens, math.ceil(num_tokens * self.config.capacity_factor / self.num_experts))

    def _choose(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(probs [T, E], chosen [T, E] bool, ids [T, E] with -1 where not chosen, capacity C)."""
        num_tokens, num_experts = x_TD.shape[0], self.num_experts
        probs = F.softmax(x_TD.float() @ self.weight.float().t(), dim=-1)
        selectable = torch.nan_to_num(probs.detach(), nan=-1.0)
        if token_mask is not None:
            selectable = selectable.masked_fill(~token_mask.unsqueeze(1), -1.0)
        c = self.capacity(num_tokens)
        tokens_EC = selectable.t().topk(c, dim=1).indices
        experts_EC = torch.arange(num_experts, device=x_TD.device).unsqueeze(1).expand(-1, c)
        chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x_TD.device)
        chosen[tokens_EC, experts_EC] = True
        ids = torch.where(chosen, torch.arange(num_experts, device=x_TD.device), -1)
        return probs, chosen, ids, c

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E], ids [T, E], -1 where expert e did not choose token t) of forward on this
        batch (expert choice depends on the whole batch: the same tokens give the same choice)."""
        probs, _, ids, _ = self._choose(x_TD, None)
        return probs, ids

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """Each expert picks its top-C tokens of the batch (not causal: see the module docstring).

        Args:
            x_TD: [T, D] tokens.
            token_mask: [T] bool, False = padding (never picked); None = all tokens.
            seq_len: unused.
        Returns:
            Routing with expert_ids [T, E] (-1 where expert e did not pick token t), weights [T, E]
            (the probability where picked, else 0), probs [T, E], no aux losses; N = E * C.
        """
        probs, chosen, ids, c = self._choose(x_TD, token_mask)
        weights = torch.where(chosen, probs, 0.0)
        return Routing(ids, weights, {}, probs, self.num_experts * c)
