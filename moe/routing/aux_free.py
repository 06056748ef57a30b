"""DeepSeek-V3 auxiliary-loss-free router: selection on s + b, gate weights from s.

The per-expert bias b is an fp32 buffer, never trained by autograd. Loads are counted in
int64 during training forwards and applied by update() (moe.update_routers) after the
optimizer step: b_i += gamma * sign(mean_load - load_i), with loads summed over the
data-parallel group (all ranks of the default group when torch.distributed is initialised).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.config import AuxFreeConfig
from moe.reference import count_tokens
from moe.routing.base import Router, Routing
from moe.routing.losses import sequence_balance_loss

__all__ = ["group_limited_topk", "AuxFreeRouter"]


def group_limited_topk(
    choice_TE: torch.Tensor, top_k: int, n_group: int, topk_group: int, group_score: str = "top2_sum"
) -> torch.Tensor:
    """ids [T, K] of the top-k experts of choice_TE within each token's best topk_group groups.

    A group is scored by the sum of its top-2 choice scores ("top2_sum", DeepSeek-V3) or by its
    best one ("max", DeepSeek-V2); experts of dropped groups are masked with -inf (not 0.0,
    which could still win against negative biased scores).
    """
    if n_group > 1:
        num_tokens, num_experts = choice_TE.shape
        grouped = choice_TE.view(num_tokens, n_group, num_experts // n_group)
        if group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice_TE = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    return choice_TE.topk(top_k, dim=-1).indices


class AuxFreeRouter(Router):
    """Sigmoid (or softmax) scores; experts selected on s + b; weights = renormalised s * scale."""

    e_score_correction_bias: torch.Tensor
    pending_load: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        config: AuxFreeConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or AuxFreeConfig()
        if num_experts % self.config.n_group:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by n_group ({self.config.n_group})")
        self.process_group = process_group
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        # Named as in DeepSeek-V3 checkpoints so they load as they are.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # .half() / .to(bfloat16) cast every float buffer; the bias must stay (at least) fp32: a
        # 1e-3 update is below half an ulp of a bf16 bias of magnitude >= 0.5 and would be lost.
        if self.e_score_correction_bias.dtype in (torch.float16, torch.bfloat16):
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def _select(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores s [T, E] fp32, ids [T, K] selected on s + b within the best groups)."""
        cfg = self.config
        if cfg.routing_dtype == "model":  # HF's MiniMax-M2: x W^T rounded to the model dtype first
            logits = F.linear(x_TD, self.weight.to(x_TD.dtype)).float()
        else:
            logits = x_TD.float() @ self.weight.float().t()
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else F.softmax(logits, dim=-1)
        choice = scores.detach() + self.e_score_correction_bias.float()
        return scores, group_limited_topk(choice, self.top_k, cfg.n_group, cfg.topk_group, cfg.group_score)

    @staticmethod
    def _probs(scores_TE: torch.Tensor) -> torch.Tensor:
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E] = s / sum(s), ids [T, K]) of forward with the current bias b; reads b, counts no
        load (pending_load untouched) and adds no loss."""
        scores, ids = self._select(x_TD)
        return self._probs(scores), ids

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """DeepSeek-V3 routing of a batch (see the module docstring for the formulas).

        Args:
            x_TD: [T, D] tokens.
            token_mask: [T] bool, False = padding (left out of the load counts and the loss); None = all.
            seq_len: tokens per sequence, for the sequence-wise balance loss (when its coefficient is > 0).
        Returns:
            Routing with expert_ids [T, K] (chosen on score + bias), weights [T, K] (from the score alone,
            scaled), probs [T, E] and the weighted aux losses; in training the loads feed update().
        """
        cfg = self.config
        scores, ids = self._select(x_TD)
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        if self.training:
            with torch.no_grad():
                counted = ids if token_mask is None else torch.where(token_mask.unsqueeze(1), ids, -1)
                self.pending_load += count_tokens(counted, self.num_experts)
        losses = {}
        if cfg.seq_aux_loss_coef > 0:
            losses["seq_balance"] = cfg.seq_aux_loss_coef * sequence_balance_loss(scores, ids, seq_len, token_mask)
        return Routing(ids, weights, losses, self._probs(scores).detach(), x_TD.shape[0] * self.top_k)

    @torch.no_grad()
    def update(self) -> None:
        """b_i += gamma * sign(mean_load - load_i) over the loads counted since the last update."""
        load = self.pending_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=self.process_group)
        if int(load.sum()) == 0:
            return
        load_f = load.float()
        self.e_score_correction_bias += self.config.bias_update_rate * torch.sign(load_f.mean() - load_f)
        self.pending_load.zero_()
