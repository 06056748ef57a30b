"""Parameterised synthetic routing traces from a latent hidden-state model.

Per token t and MoE layer l a hidden state h[t, l] in R^d is drawn; routers are fixed random
W_l [E, d] plus a per-layer Zipf popularity bias, and experts = top-k(softmax(s * W_l h + b_l)):
    g[t, l] = sqrt(w_tok) * u_l[token_t] + sqrt(1 - w_tok) * a[t, l]      token identity + context
    a[t, l] = reuse * a[t-1, l] + sqrt(1 - reuse^2) * noise                 reuse between tokens
    h[t, l] = cross * h[t, l-1] + sqrt(1 - cross^2) * g[t, l]               cross-layer correlation
Tokens follow a Zipf law over a vocabulary. Because routing comes from hidden states, the
predictive policy can apply "next layer's router to the current hidden state" exactly as on a
real model (ahead_SAE). Random-init models route unrealistically; this gives knobs instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe.config import check_int, check_unit, positional_deprecated
from moe.offload.trace import Trace

__all__ = ["SyntheticConfig", "synthetic_tokens", "synthetic_trace"]


@positional_deprecated
@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Knobs of the synthetic trace (defaults: the calibrated setting of benchmarks/offload.py).

    Attributes:
        num_layers, num_experts, top_k: L MoE layers of E experts, k per token.
        tokens: T decode steps (one token each).
        zipf: exponent of the per-layer expert popularity bias.
        reuse: correlation of a token's context with the previous token's, in [0, 1].
        cross_layer: correlation of a layer's hidden state with the previous layer's, in [0, 1].
        token_identity: share of the hidden state fixed by the token id, in [0, 1].
        vocab, vocab_zipf: vocabulary size and the Zipf exponent tokens are drawn with.
        dim: d, width of the latent hidden state.
        sharpness: s, scale of the router logits (higher = more decisive routing).
        lookahead: layers ahead whose router scores are recorded for the predictive policy.
        seed: seeds the generator.
    """

    num_layers: int = 16
    num_experts: int = 64
    top_k: int = 8
    tokens: int = 400
    zipf: float = 1.0
    reuse: float = 0.8
    cross_layer: float = 0.7
    token_identity: float = 0.3
    vocab: int = 2000
    vocab_zipf: float = 1.1
    dim: int = 32
    sharpness: float = 3.0
    lookahead: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "tokens", "vocab", "dim"):
            check_int(name, getattr(self, name), 1)
        check_int("lookahead", self.lookahead, 0)
        for name in ("reuse", "cross_layer", "token_identity"):
            check_unit(name, getattr(self, name))
        for name in ("zipf", "vocab_zipf"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0 = uniform), got {getattr(self, name)}")
        if not self.sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")


def _zipf_probs(n: int, s: float) -> torch.Tensor:
    w = torch.arange(1, n + 1, dtype=torch.float64) ** -s
    return (w / w.sum()).float()


def _draw_tokens(cfg: SyntheticConfig, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(_zipf_probs(cfg.vocab, cfg.vocab_zipf), cfg.tokens, replacement=True, generator=g)


def synthetic_tokens(cfg: SyntheticConfig) -> torch.Tensor:
    """The token ids [T] synthetic_trace(cfg) routes, one per decode step (the batched benchmark's
    token-id predictor reads them)."""
    return _draw_tokens(cfg, torch.Generator().manual_seed(cfg.seed))


def synthetic_trace(cfg: SyntheticConfig) -> Trace:
    """A token-by-token decode trace: T * L steps, one token per step."""
    g = torch.Generator().manual_seed(cfg.seed)
    t_, l_, e_, d = cfg.tokens, cfg.num_layers, cfg.num_experts, cfg.dim
    tokens = _draw_tokens(cfg, g)
    u = torch.randn(l_, cfg.vocab, d, generator=g)
    w = torch.randn(l_, e_, d, generator=g) / math.sqrt(d)
    bias = torch.stack([-cfg.zipf * torch.log1p(torch.randperm(e_, generator=g).float()) for _ in range(l_)])
    a = torch.zeros(l_, d)
    h = torch.zeros(t_, l_, d)
    for t in range(t_):
        a = (
            cfg.reuse * a + math.sqrt(1 - cfg.reuse**2) * torch.randn(l_, d, generator=g)
            if t
            else torch.randn(l_, d, generator=g)
        )
        gt = math.sqrt(cfg.token_identity) * u[:, tokens[t]] + math.sqrt(1 - cfg.token_identity) * a
        prev = gt[0]
        h[t, 0] = prev
        for layer in range(1, l_):
            prev = cfg.cross_layer * prev + math.sqrt(1 - cfg.cross_layer**2) * gt[layer]
            h[t, layer] = prev

    def logits(hid_TD: torch.Tensor, layer: int) -> torch.Tensor:
        return cfg.sharpness * hid_TD @ w[layer].t() + bias[layer]

    probs = torch.stack([torch.softmax(logits(h[:, layer], layer), -1) for layer in range(l_)], 1)  # [T, L, E]
    ids = probs.topk(cfg.top_k, dim=-1).indices.sort(-1).values  # [T, L, K]
    ahead = torch.zeros(t_, l_, max(cfg.lookahead, 1), e_)
    for layer in range(l_):
        for j in range(cfg.lookahead):
            target = layer + j + 1
            if target < l_:
                p = torch.softmax(logits(h[:, layer], target), -1)
                pred = p.topk(cfg.top_k, dim=-1).indices
                ahead[:, layer, j] = torch.zeros_like(p).scatter_(1, pred, 1.0) * p
    return Trace(
        l_,
        e_,
        torch.arange(l_).repeat(t_),
        ids.reshape(t_ * l_, cfg.top_k),
        probs.reshape(t_ * l_, e_),
        ahead.reshape(t_ * l_, -1, e_)[:, : cfg.lookahead] if cfg.lookahead else None,
        1,
        f"synthetic {cfg}",
    )
