"""A deliberately dumb per-token MoE: the oracle the layer's data path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moe


def per_token_moe(layer: moe.MoE, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) (+ shared), one token and expert at a time."""
    h = layer.config.hidden_dim
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1], dtype=acc_dtype)
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            a = x_TD[t] @ layer.experts.w_in[e]
            a = F.silu(a[:h]) * a[h:] if layer.config.activation == "swiglu" else F.gelu(a)
            acc = acc + weights_TK[t, k].to(acc_dtype) * (a @ layer.experts.w_out[e]).to(acc_dtype)
        rows.append(acc.to(x_TD.dtype))
    y = torch.stack(rows) if rows else x_TD * 0.0  # keeps the graph for T = 0
    if layer.shared_experts is not None:
        shared = layer.shared_experts(x_TD)
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(layer.shared_expert_gate(x_TD)) * shared
        y = y + shared
    return y
