"""Routing traces: which experts each layer step used, saved as safetensors (never pickle).

A step is one forward of one MoE layer (one decode token, or a whole prefill batch).
Shape legend: S steps, M max experts used by a step, E experts, A lookahead layers.

Tensors of a Trace:
    layer_S      int64  MoE layer ordinal of each step.
    experts_SM   int64  experts with tokens at the step, ascending, -1 = padding.
    probs_SE     fp32   mean router probabilities of the step's tokens (optional).
    ahead_SAE    fp32   for layers l+1..l+A: that layer's router applied to this layer's hidden state;
                        per expert the mean over the step's tokens of its probability where it is in
                        the token's top-k, else 0 (moe.offload.predict.votes; optional).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from moe.offload.policies import Key

__all__ = ["Trace", "TraceBuilder", "TraceRecorder"]


@dataclass
class Trace:
    """A routing trace; see the module docstring for the tensors."""

    num_layers: int
    num_experts: int
    layer_S: torch.Tensor
    experts_SM: torch.Tensor
    probs_SE: torch.Tensor | None = None
    ahead_SAE: torch.Tensor | None = None
    expert_bytes: int = 1
    source: str = ""

    @property
    def num_steps(self) -> int:
        """S: the number of layer steps in the trace."""
        return int(self.layer_S.shape[0])

    @property
    def lookahead(self) -> int:
        """A: how many later layers ahead_SAE covers (0 without it)."""
        return 0 if self.ahead_SAE is None else int(self.ahead_SAE.shape[1])

    def needed(self, s: int) -> list[int]:
        """The experts with tokens at step `s`, ascending (experts_SM[s] without its -1 padding)."""
        row = self.experts_SM[s]
        return [int(e) for e in row[row >= 0].tolist()]

    def select(self, steps_S: torch.Tensor) -> Trace:
        """The trace restricted to the steps `steps_S` (int64 indices, kept in that order): every
        per-step tensor indexed alike, the rest unchanged."""
        return dataclasses.replace(
            self,
            layer_S=self.layer_S[steps_S],
            experts_SM=self.experts_SM[steps_S],
            probs_SE=None if self.probs_SE is None else self.probs_SE[steps_S],
            ahead_SAE=None if self.ahead_SAE is None else self.ahead_SAE[steps_S],
        )

    def requests(self) -> list[Key]:
        """Every (layer, expert) request in the order the cache engine touches them."""
        out: list[Key] = []
        for s in range(self.num_steps):
            layer = int(self.layer_S[s])
            out.extend((layer, e) for e in self.needed(s))
        return out

    def save(self, path: str) -> None:
        """Writes a .safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {"layer_S": self.layer_S.contiguous(), "experts_SM": self.experts_SM.contiguous()}
        if self.probs_SE is not None:
            tensors["probs_SE"] = self.probs_SE.to(torch.float16).contiguous()
        if self.ahead_SAE is not None:
            tensors["ahead_SAE"] = self.ahead_SAE.to(torch.float16).contiguous()
        meta = {"num_layers": self.num_layers, "num_experts": self.num_experts, "expert_bytes": self.expert_bytes}
        save_file(tensors, path, metadata={"moe_trace": json.dumps(meta), "source": self.source})

    @classmethod
    def load(cls, path: str) -> Trace:
        """Reads a trace written by save()."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta_all = f.metadata() or {}
            if "moe_trace" not in meta_all:
                raise ValueError(f"{path!r} is not a moe.offload trace (no 'moe_trace' metadata)")
            meta = json.loads(meta_all["moe_trace"])
            keys = set(f.keys())
            get = f.get_tensor
            probs = get("probs_SE").float() if "probs_SE" in keys else None
            ahead = get("ahead_SAE").float() if "ahead_SAE" in keys else None
            return cls(
                int(meta["num_layers"]),
                int(meta["num_experts"]),
                get("layer_S"),
                get("experts_SM"),
                probs,
                ahead,
                int(meta.get("expert_bytes", 1)),
                meta_all.get("source", ""),
            )


class TraceBuilder:
    """Accumulates steps and builds a Trace."""

    def __init__(self, num_layers: int, num_experts: int, lookahead: int = 0) -> None:
        self.num_layers, self.num_experts, self.lookahead = num_layers, num_experts, lookahead
        self.layers: list[int] = []
        self.experts: list[list[int]] = []
        self.probs: list[torch.Tensor | None] = []
        self.ahead: list[list[tuple[int, torch.Tensor]]] = []

    def add(
        self, layer: int, needed: list[int], probs_E: torch.Tensor | None, ahead: list[tuple[int, torch.Tensor]]
    ) -> None:
        """Appends one layer step.

        Args:
            layer: the MoE layer ordinal.
            needed: the experts with tokens at this step (any order).
            probs_E: [E'] mean router probabilities of the step (E' <= E; padded with 0), or None.
            ahead: (later layer, probs [E']) per layer ahead, as in ahead_SAE.
        """
        self.layers.append(layer)
        self.experts.append(sorted(needed))
        self.probs.append(probs_E)
        self.ahead.append(ahead)

    def build(self, expert_bytes: int = 1, source: str = "") -> Trace:
        """The Trace of the steps added so far (experts_SM [S, M] padded with -1, probs_SE and
        ahead_SAE only when every step had them); expert_bytes and source are kept as metadata.
        """
        s, e = len(self.layers), self.num_experts
        width = max((len(x) for x in self.experts), default=1) or 1
        experts = torch.full((s, width), -1, dtype=torch.int64)
        for i, row in enumerate(self.experts):
            experts[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        probs = None
        if s and all(p is not None for p in self.probs):
            probs = torch.stack([torch.nn.functional.pad(p.float(), (0, e - p.shape[0])) for p in self.probs])  # type: ignore[union-attr]
        ahead = None
        if self.lookahead and s:
            ahead = torch.zeros(s, self.lookahead, e)
            for i, (layer, preds) in enumerate(zip(self.layers, self.ahead, strict=True)):
                for target, v in preds:
                    ahead[i, target - layer - 1, : v.shape[0]] = v
        return Trace(
            self.num_layers,
            e,
            torch.tensor(self.layers, dtype=torch.int64),
            experts,
            probs,
            ahead,
            expert_bytes,
            source,
        )


class TraceRecorder:
    """Records the routing of any model built from moe.MoE layers (patched HF models included).

        with TraceRecorder(model, lookahead=1) as rec:
            model.generate(...)
        rec.trace().save("run.safetensors")

    Each forward of each MoE layer is one step: the experts its router chose (before any capacity
    drop; padding tokens excluded), recorded from the router's output, so every router kind is
    recorded; the lookahead predictions apply the next layers' routers to this layer's input
    (routers moe.offload.predict.route cannot evaluate contribute no prediction).
    """

    def __init__(self, model: torch.nn.Module, lookahead: int = 1) -> None:
        from moe.layer import MoE

        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        if not self.layers:
            raise ValueError(
                "model has no moe.MoE layers to record (patch HF models with moe.integrations.transformers.patch)"
            )
        e = max(m.config.num_experts for m in self.layers)
        self.builder = TraceBuilder(len(self.layers), e, lookahead)
        self.lookahead = lookahead
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TraceRecorder:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.router.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, i: int):  # noqa: ANN202
        from moe.offload.predict import forecast

        routers = [m.router for m in self.layers]

        def hook(router: torch.nn.Module, args: tuple, kwargs: dict, routing: object) -> None:
            # The router's own decision (any router kind; padding tokens excluded), and the
            # later layers' routers applied to this layer's input for the lookahead.
            x_TD = args[0]
            ids = routing.expert_ids  # type: ignore[attr-defined]
            mask = kwargs.get("token_mask")
            if mask is not None:
                ids = ids[mask.reshape(-1)]
            needed = sorted(set(ids[ids >= 0].tolist()))
            probs_TE = routing.probs  # type: ignore[attr-defined]
            probs = None if probs_TE is None else probs_TE.float().mean(0).cpu()
            _, _, ahead = forecast(routers, i, x_TD, self.lookahead)
            self.builder.add(i, needed, probs, ahead)

        return hook

    def trace(self, source: str = "recorded") -> Trace:
        """The Trace of everything recorded so far."""
        return self.builder.build(source=source)
