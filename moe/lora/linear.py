"""A frozen nn.Linear plus a routed mixture of LoRA experts (MoLA / DynMoLE).

Shape legend: T = tokens, D = in_features, N = out_features, E = LoRA experts, R = rank,
K = routed slots per token (top_k for "topk", E for "dynmole"; -1 ids mark unused slots).

    y = base(x) + scaling * sum_e w_e(x) * (x A_e) B_e,   scaling = alpha / R,
    A_EDR = lora_A [E, D, R] (uniform +-1/sqrt(D)), B_ERN = lora_B [E, R, N] (zeros at init,
    so the wrapped layer returns exactly the base output).

The experts of one layer run as one batched computation, never a Python loop over experts:
    compute="dense":   [T, D] @ [D, E*R] -> gate each expert's R columns by w_TE (0 when not
                       selected) -> [T, E*R] @ [E*R, N]. Two plain GEMMs; exact, because an
                       unselected expert contributes 0 * finite = 0 and gets a zero gradient.
    compute="grouped": sort the T*K token copies by expert (moe.ops.sort_by_expert), gather
                       (moe.ops.permute), two moe.ops.grouped_mm, weighted combine in fp32
                       (moe.ops.unpermute). Does K/E of the dense FLOPs.
    compute="auto":    "dense" when E * R <= DENSE_MAX_COLUMNS. The LoRA GEMMs are thin
                       (R = 8): dense costs T*E*R*(D+N) multiply-adds, while the grouped path
                       moves T*K*(D+N) values through gather/scatter, sorts, and launches 2E
                       small GEMMs; below a few hundred columns the dense GEMM is cheaper (see
                       the timing in the report), above it the grouped path wins on FLOPs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from moe import ops
from moe.config import TopKConfig
from moe.dispatch import LocalDispatcher
from moe.lora.dynmole import DynMoLERouter
from moe.routing.base import Router, Routing
from moe.routing.topk import TopKRouter

__all__ = ["RouterName", "Compute", "DENSE_MAX_COLUMNS", "lora_experts_dense", "lora_experts_grouped", "LoRAMoELinear"]


RouterName = Literal["topk", "dynmole"]
Compute = Literal["auto", "dense", "grouped"]
DENSE_MAX_COLUMNS = 512


def lora_experts_dense(
    x_TD: torch.Tensor, a_EDR: torch.Tensor, b_ERN: torch.Tensor, gate_TE: torch.Tensor
) -> torch.Tensor:
    """sum_e gate[t, e] * (x_t A_e) B_e for all experts at once: [T, N].

    Args:
        x_TD: [T, D] tokens.
        a_EDR: [E, D, R], b_ERN: [E, R, N] expert matrices.
        gate_TE: [T, E] per-token expert weights (0 for unselected experts), x's dtype.
    """
    num_experts, dim, rank = a_EDR.shape
    h_TC = x_TD @ a_EDR.permute(1, 0, 2).reshape(dim, num_experts * rank)  # C = E * R
    h_TC = h_TC * gate_TE.repeat_interleave(rank, dim=1)
    return h_TC @ b_ERN.reshape(num_experts * rank, -1)


def lora_experts_grouped(
    x_TD: torch.Tensor,
    a_EDR: torch.Tensor,
    b_ERN: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """sum_k weights[t, k] * (x_t A_{ids[t,k]}) B_{ids[t,k]} through the grouped-GEMM ops: [T, N].

    Args:
        ids_TK: [T, K] int64 expert ids, -1 = unused slot (its weight must be 0).
        weights_TK: [T, K] gate weights.
    """
    dispatcher = LocalDispatcher(a_EDR.shape[0], backend)  # the same seam as the MoE layer's
    x_ND, counts_E, state = dispatcher.dispatch(x_TD, Routing(ids_TK, weights_TK))
    h_NR = ops.grouped_mm(x_ND, a_EDR, counts_E, backend)
    y_NN = ops.grouped_mm(h_NR, b_ERN, counts_E, backend)  # rows past counts.sum() are zero
    return dispatcher.combine(y_NN, state)


class LoRAMoELinear(nn.Module):
    """Frozen base nn.Linear + E LoRA experts with their own router on the layer input.

    Args:
        base: the nn.Linear to adapt (kept as `self.base`, frozen by apply_lora_moe).
        num_experts: E >= 1; E = 1 is plain LoRA (no router, weight 1).
        rank: R; alpha: LoRA alpha (scaling = alpha / R).
        router: "topk" (MoLA: softmax, top-k renormalised) or "dynmole".
        top_k: experts per token for "topk" (clamped to E).
        balance_coef: weight of the balance loss (topk: Switch f*P, off by default, MoLA's
            optional value is 1e-3; dynmole: soft f*P, default 1e-3).
        entropy_coef: DynMoLE Tsallis-entropy loss weight (default 0.01).
        compute: "auto" | "dense" | "grouped" (see the module docstring).
        backend: op backend for the grouped path.

    Attributes:
        aux_losses: the latest forward's weighted router losses (collected by moe.aux_loss).
        last_routing: the latest Routing (None for E = 1), for statistics.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        router: RouterName = "topk",
        top_k: int = 2,
        balance_coef: float | None = None,
        entropy_coef: float = 0.01,
        compute: Compute = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRAMoELinear wraps nn.Linear, got {type(base).__name__}")
        for name, value in (("num_experts", num_experts), ("rank", rank), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if router not in ("topk", "dynmole"):
            raise ValueError(f"router must be 'topk', 'dynmole' or 'mos' (apply_lora_moe), got {router!r}")
        if compute not in ("auto", "dense", "grouped"):
            raise ValueError(f"compute must be 'auto', 'dense' or 'grouped', got {compute!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank, self.alpha = num_experts, rank, float(alpha)
        self.router_name, self.top_k = router, min(top_k, num_experts)
        self.scaling = self.alpha / rank
        self.compute, self.backend = compute, backend
        self.balance_coef = (1e-3 if router == "dynmole" else 0.0) if balance_coef is None else float(balance_coef)
        self.entropy_coef = float(entropy_coef)
        factory: dict[str, Any] = dict(device=base.weight.device, dtype=base.weight.dtype)
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.in_features, rank, **factory).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, self.out_features, **factory))
        self.router: Router | None = None
        if num_experts > 1 and router == "topk":
            # Renormalising one selected weight makes it exactly 1: a top-1 router would get no
            # gradient at all, so top-1 keeps its softmax probability (as Switch does).
            config = TopKConfig(norm_topk_prob=self.top_k > 1, aux_loss_coef=self.balance_coef)
            self.router = TopKRouter(self.in_features, num_experts, self.top_k, config)
        elif num_experts > 1:
            self.router = DynMoLERouter(self.in_features, num_experts, self.entropy_coef, self.balance_coef)
        if self.router is not None:
            self.router.to(device=base.weight.device)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: Routing | None = None

    def spec(self) -> dict[str, Any]:
        """The settings that rebuild this module on a fresh base (saved in checkpoints)."""
        return dict(
            kind="lora_moe",
            in_features=self.in_features,
            out_features=self.out_features,
            num_experts=self.num_experts,
            rank=self.rank,
            alpha=self.alpha,
            router=self.router_name,
            top_k=self.top_k,
            balance_coef=self.balance_coef,
            entropy_coef=self.entropy_coef,
        )

    def use_dense(self) -> bool:
        """Whether forward computes every expert densely (E * r <= DENSE_MAX_COLUMNS under 'auto')."""
        if self.compute == "auto":
            return self.num_experts * self.rank <= DENSE_MAX_COLUMNS
        return self.compute == "dense"

    def lora_delta(self, x_TD: torch.Tensor) -> torch.Tensor:
        """scaling * sum_e w_e (x A_e) B_e: [T, N] in x's dtype; sets aux_losses."""
        if self.router is None:
            self.aux_losses, self.last_routing = {}, None
            return (x_TD @ self.lora_A[0]) @ self.lora_B[0] * self.scaling
        routing = self.router(x_TD)
        self.aux_losses, self.last_routing = routing.aux_losses, routing
        weights_TK = routing.weights.to(x_TD.dtype) * self.scaling
        if self.use_dense():
            ids_TK = routing.expert_ids
            gate_TE = x_TD.new_zeros(x_TD.shape[0], self.num_experts + 1)
            gate_TE = gate_TE.scatter_add(1, torch.where(ids_TK < 0, self.num_experts, ids_TK), weights_TK)
            return lora_experts_dense(x_TD, self.lora_A, self.lora_B, gate_TE[:, : self.num_experts])
        return lora_experts_grouped(x_TD, self.lora_A, self.lora_B, routing.expert_ids, weights_TK, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., N]: base(x) + the routed LoRA experts."""
        x_TD = x.reshape(-1, self.in_features)
        return self.base(x) + self.lora_delta(x_TD).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
            f"alpha={self.alpha}, router={self.router_name}, top_k={self.top_k}"
        )
