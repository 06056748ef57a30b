"""Auxiliary losses of routers (unweighted; routers multiply by their coefficients).

Formulas from REFERENCES.md: Switch/GShard balance, ST-MoE z-loss, DeepSeek-V3 sequence-wise
balance. Padding tokens (token_mask False) are excluded from every term.
"""

from __future__ import annotations

import torch

from moe.reference import count_tokens
from moe.routing.base import masked_mean

__all__ = ["balance_loss", "z_loss", "sequence_balance_loss"]


def _masked_ids(expert_ids_TK: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return expert_ids_TK
    return torch.where(token_mask.unsqueeze(1), expert_ids_TK, -1)


def balance_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_i f_i P_i.

    f_i = (copies routed to i) / (T * K) and P_i = mean_t probs[t, i], over real tokens, so the
    perfectly balanced value is 1 (HF Mixtral divides by T instead: its balanced value is K).
    f is a count (no gradient); the gradient flows through P.
    """
    num_tokens, num_experts = probs_TE.shape
    k = expert_ids_TK.shape[1]
    real = num_tokens if token_mask is None else int(token_mask.sum())
    if real == 0:
        return probs_TE.sum() * 0.0
    f = count_tokens(_masked_ids(expert_ids_TK, token_mask), num_experts).float() / (real * k)
    p = masked_mean(probs_TE, token_mask)
    return num_experts * (f * p).sum()


def z_loss(logits_TE: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return masked_mean(torch.logsumexp(logits_TE.float(), dim=-1) ** 2, token_mask)


def sequence_balance_loss(
    scores_TE: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    seq_len: int | None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    Per sequence of S real tokens: f_i = E / (K S) * count_i, P_i = mean_t of scores normalised
    to sum 1 per token. seq_len None treats the whole batch as one sequence.
    """
    num_tokens, num_experts = scores_TE.shape
    k = expert_ids_TK.shape[1]
    if num_tokens == 0:
        return scores_TE.sum() * 0.0
    s = seq_len or num_tokens
    num_seqs = num_tokens // s
    mask = torch.ones(num_tokens, dtype=torch.bool, device=scores_TE.device) if token_mask is None else token_mask
    norm = scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)
    ids = _masked_ids(expert_ids_TK, mask).view(num_seqs, s * k)
    one_hot = torch.zeros(num_seqs, num_experts + 1, device=scores_TE.device)
    one_hot.scatter_add_(1, torch.where(ids < 0, num_experts, ids), torch.ones_like(ids, dtype=one_hot.dtype))
    real = mask.view(num_seqs, s).sum(1, keepdim=True).clamp(min=1).float()
    f = one_hot[:, :num_experts] * num_experts / (k * real)
    p = (norm.view(num_seqs, s, num_experts) * mask.view(num_seqs, s, 1)).sum(1) / real
    return (f * p).sum(1).mean()
