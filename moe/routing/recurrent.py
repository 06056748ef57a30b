"""Layerwise recurrent router (RMoE): one GRU cell shared by the MoE layers of a model.

Layer i routes with logits_i = W2_i h_i, h_i = GRUCell(W1_i x_i, h_{i-1}), h_0 = 0 per token.
Tokens stay parallel; the recurrence runs across layers and is not detached, so gradients of
layer i's routing reach the routers of earlier layers.

How the state is scoped (no change to the model's forward is needed):
- The state lives on a RecurrentCore object, shared by the routers of ONE model
  (tie_recurrent_routers(model) builds it); two models have two cores, never a global.
- A forward pass starts when the router with layer_index 0 runs: the chain is reset. Router
  i then reads the state left by router i - 1 in the same pass, and raises a clear error if
  router i - 1 has not run in this pass or ran on a different number of tokens.
- Activation checkpointing (non-reentrant, torch's recommended mode): when a layer is
  recomputed during backward, its router reuses the input state it saw in the original
  forward and does not touch the chain, so recomputation gives the same values and the
  gradient to earlier layers flows through the original graph. The states of the last
  MAX_PASSES grad-enabled passes are kept per layer (detached: they share memory with the
  graph's own), each with a fingerprint of the router input, so a recomputation finds the
  state of its own pass when several forwards precede one backward (gradient accumulation
  over a pair of batches, say); none is kept under no_grad. A recomputation that finds no
  matching pass raises instead of computing with another pass's state.
  Reentrant checkpointing cuts any state not passed as an argument: do not use it here.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from moe.config import RecurrentConfig
from moe.routing.base import Router, Routing
from moe.routing.topk import router_losses, softmax_topk

__all__ = ["MAX_PASSES", "RecurrentCore", "RecurrentRouter", "tie_recurrent_routers"]


MAX_PASSES = 4  # forward passes whose input states are kept for activation-checkpoint recompute


def _in_backward() -> bool:
    # -1 outside the autograd engine; checkpoint recomputation runs inside a graph task.
    return torch._C._current_graph_task_id() != -1


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Two sums of x, computed on x's device (no host sync); recomputation reproduces x bitwise."""
    x = x.detach().float()
    return torch.stack([x.sum(), x.abs().sum()])


class RecurrentCore(nn.Module):
    """The shared GRU cell plus the per-forward-pass chain state of one model."""

    def __init__(self, recurrent_dim: int) -> None:
        super().__init__()
        self.recurrent_dim = recurrent_dim
        self.cell = nn.GRUCell(recurrent_dim, recurrent_dim)
        self.num_layers = 0
        # layer -> (fingerprint of its router input, its input state) of the last MAX_PASSES passes
        self._h_in: dict[int, deque[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._h_last: torch.Tensor | None = None
        self._last_index = -1

    def __getstate__(self) -> dict:
        # The chain of the last pass is part of its autograd graph (copy.deepcopy and pickling
        # refuse non-leaf tensors) and means nothing to a copy: copies start fresh.
        state = dict(self.__dict__)
        state.update(_h_in={}, _h_last=None, _last_index=-1)
        return state

    def run_cell(self, x_TR: torch.Tensor, h_TR: torch.Tensor) -> torch.Tensor:
        """One GRU step in the cell's dtype (bf16 weights of a bf16 model included), returned in
        x_TR's dtype (fp32, or fp64 for an fp64 model): h [T, R]."""
        dtype = self.cell.weight_ih.dtype
        return self.cell(x_TR.to(dtype), h_TR.to(dtype)).to(x_TR.dtype)

    def attach(self) -> int:
        """Registers one more router and returns its layer index."""
        self.num_layers += 1
        return self.num_layers - 1

    def reset(self) -> None:
        """Drops the chain and every kept state (layer 0 restarts the chain by itself)."""
        self._h_in.clear()
        self._h_last, self._last_index = None, -1

    def _recompute(self, layer_index: int, x_TR: torch.Tensor) -> torch.Tensor:
        mark = _fingerprint(x_TR)
        for seen, h_in in reversed(self._h_in[layer_index]):
            if seen.shape == mark.shape and torch.equal(seen, mark):
                return self.run_cell(x_TR, h_in)
        raise RuntimeError(
            f"recurrent router {layer_index}: activation-checkpoint recomputation found no forward pass with this "
            f"input among the last {MAX_PASSES} (more forwards than that before one backward, or the input changed); "
            "run backward sooner or do not checkpoint the layers of recurrent routers"
        )

    def state_before(self, layer_index: int, x_TR: torch.Tensor) -> torch.Tensor:
        """h_{i-1} [T, R] that step(layer_index, x_TR) would read now, without changing the chain:
        zeros for layer 0, else the state router i-1 left in this forward pass.

        Raises:
            RuntimeError: router i-1 has not run in this pass (or on another number of tokens).
        """
        if layer_index == 0:
            return x_TR.new_zeros(x_TR.shape[0], self.recurrent_dim)
        h_last = self._h_last
        if self._last_index != layer_index - 1 or h_last is None:
            raise RuntimeError(
                f"recurrent router {layer_index} ran before router {layer_index - 1} in this forward "
                f"pass (last ran: {self._last_index}); layers must run in the order they were tied "
                "(moe.tie_recurrent_routers(model) ties them in module order)"
            )
        if h_last.shape[0] != x_TR.shape[0]:
            raise RuntimeError(
                f"recurrent router {layer_index} got {x_TR.shape[0]} tokens but router "
                f"{layer_index - 1} got {h_last.shape[0]}; all tied layers must see the same tokens"
            )
        return h_last

    def step(self, layer_index: int, x_TR: torch.Tensor) -> torch.Tensor:
        """h_i = GRUCell(x_TR, h_{i-1}) for the router at layer_index; returns h_i [T, R]."""
        if _in_backward() and self._h_in.get(layer_index):
            return self._recompute(layer_index, x_TR)
        h_prev = self.state_before(layer_index, x_TR)
        if layer_index == 0:
            self._h_last, self._last_index = None, -1
        if torch.is_grad_enabled():
            # Recomputation must save the same tensors as this forward: keep requires_grad.
            kept = self._h_in.setdefault(layer_index, deque(maxlen=MAX_PASSES))
            kept.append((_fingerprint(x_TR), h_prev.detach().requires_grad_(h_prev.requires_grad)))
        h = self.run_cell(x_TR, h_prev)
        self._h_last, self._last_index = h, layer_index
        return h


class RecurrentRouter(Router):
    """RMoE router of one layer: W1 (proj_in), the shared core's GRU, W2 (proj_out).

    probe reads (never writes) the chain state h_{i-1} carried from the previous layer's router,
    so it is not standalone: a forecaster cannot apply it to another layer's hidden state.
    """

    probe_standalone = False

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        config: RecurrentConfig | None = None,
        core: RecurrentCore | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.config = config or RecurrentConfig()
        r = self.config.recurrent_dim
        if core is not None and core.recurrent_dim != r:
            raise ValueError(f"core.recurrent_dim ({core.recurrent_dim}) != config.recurrent_dim ({r})")
        self.proj_in = nn.Linear(dim, r, bias=False)
        self.proj_out = nn.Linear(r, num_experts, bias=False)
        # A lone router gets its own core (a chain of one); tie_recurrent_routers shares one.
        self.core = core if core is not None else RecurrentCore(r)
        self.layer_index = self.core.attach()

    def forward(
        self, x_TD: torch.Tensor, token_mask: torch.Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """Routes with the GRU state shared across layers (RMoE): softmax top-k of the recurrent logits.

        Args:
            x_TD: [T, D] tokens of this layer.
            token_mask: [T] bool, False = padding (left out of the aux losses); None = all tokens.
            seq_len: unused.
        Returns:
            Routing with expert_ids [T, K], weights [T, K], probs [T, E] and the balance / z losses.
        """
        h = self.core.step(self.layer_index, self._project(x_TD))
        logits = (h @ self.proj_out.weight.to(h.dtype).t()).float()
        probs, weights, ids = softmax_topk(logits, self.top_k, self.config.norm_topk_prob)
        losses = router_losses(logits, probs, ids, self.config.aux_loss_coef, self.config.z_loss_coef, token_mask)
        return Routing(ids, weights, losses, probs, x_TD.shape[0] * self.top_k)

    def _project(self, x_TD: torch.Tensor) -> torch.Tensor:
        # fp32 at least (the routing math runs in fp32); fp64 when the router's weights are fp64.
        dtype = torch.promote_types(self.proj_in.weight.dtype, torch.float32)
        return self.proj_in(x_TD.to(self.proj_in.weight.dtype)).to(dtype)

    @torch.no_grad()
    def probe(self, x_TD: torch.Tensor, h_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [T, E], ids [T, K]) forward would give now, without advancing the chain.

        State used: h_{i-1} [T, R], the GRU state entering this layer: `h_prev` when given, else
        zeros for layer 0 and, for layer i > 0, the state router i-1 left in the current forward
        pass (RecurrentCore.state_before; RuntimeError when router i-1 has not run in it). The
        chain, the kept activation-checkpoint states and the RNG are not touched.
        """
        x_TR = self._project(x_TD)
        h_in = self.core.state_before(self.layer_index, x_TR) if h_prev is None else h_prev
        h = self.core.run_cell(x_TR, h_in)
        probs, _, ids = softmax_topk((h @ self.proj_out.weight.to(h.dtype).t()).float(), self.top_k, False)
        return probs, ids


def tie_recurrent_routers(model: nn.Module, core: RecurrentCore | None = None) -> RecurrentCore:
    """Makes every RecurrentRouter in `model` share one core, indexed in module order.

    Call it after building the model and before creating the optimizer (the routers' own
    cores are replaced). Returns the shared core.
    """
    routers = [m for m in model.modules() if isinstance(m, RecurrentRouter)]
    if not routers:
        raise ValueError("model has no RecurrentRouter; build its MoE layers with router='recurrent'")
    dims = {r.config.recurrent_dim for r in routers}
    if len(dims) != 1:
        raise ValueError(f"recurrent routers of one model must share recurrent_dim, got {sorted(dims)}")
    core = core if core is not None else routers[0].core
    core.num_layers = 0
    core.reset()
    for router in routers:
        router.core = core
        router.layer_index = core.attach()
    return core
