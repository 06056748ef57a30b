"""The dispatcher and experts seams: custom implementations plug into MoE.forward unchanged."""

from __future__ import annotations

import pytest
import torch

import moe
from moe.dispatch import Dispatcher, LocalDispatcher
from moe.experts import Experts, ExpertsBase, expert_mlp, shared_output, supports_fused
from moe.routing import Routing
from moe.routing.capacity import drop_over_capacity

CPU = torch.device("cpu")


class LoopDispatcher(Dispatcher):
    """A plain-Python dispatcher: one row per (token, slot), ordered by expert."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):  # type: ignore[no-untyped-def]
        rows = [
            (int(e), t, routing.weights[t, k])
            for t in range(x_TD.shape[0])
            for k, e in enumerate(routing.expert_ids[t])
            if e >= 0
        ]
        rows.sort(key=lambda r: r[0])
        counts = torch.bincount(torch.tensor([r[0] for r in rows], dtype=torch.int64), minlength=self.num_experts)
        x_sorted = torch.stack([x_TD[t] for _, t, _ in rows]) if rows else x_TD[:0]
        return x_sorted, counts, (rows, x_TD.shape[0])

    def combine(self, y_sorted: torch.Tensor, state):  # type: ignore[no-untyped-def]
        rows, num_tokens = state
        y = y_sorted.new_zeros(num_tokens, y_sorted.shape[1], dtype=torch.float32)
        for (_, t, w), row in zip(rows, y_sorted, strict=True):
            y[t] += w * row.float()
        return y


class CountingExperts(ExpertsBase):
    """Experts of a new kind: the protocol only (no fused path), wrapping the weights of another."""

    def __init__(self, inner: Experts) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    @property
    def w_in(self) -> torch.Tensor:  # MoE checks the input's device and dtype against it
        return self.inner.w_in

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return expert_mlp(x_ND, self.inner.w_in, self.inner.w_out, counts_E, self.inner.activation, "reference")


def _layer(**kw) -> moe.MoE:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return moe.MoE(12, 20, 4, 2, num_shared_experts=1, shared_expert_gate=True, **kw)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_a_custom_dispatcher_plugs_in(capacity_factor: float | None) -> None:
    layer = _layer(capacity_factor=capacity_factor)
    x = torch.randn(2, 7, 12)
    want = layer(x)
    layer.dispatcher = LoopDispatcher(4)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_experts_plug_in_and_are_not_asked_to_fuse(backend: str) -> None:
    """Experts without the fused capability get gathered rows, even where the backend is Triton:
    nobody patches the dispatcher's backend (moe.offload's loader used to)."""
    layer = _layer(backend=backend)
    ref = _layer(backend="reference")
    x = torch.randn(3, 5, 12)
    want = ref(x)
    experts = CountingExperts(layer.experts)
    assert not supports_fused(experts, CPU)
    layer.experts = experts  # type: ignore[assignment]
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert experts.calls == 1 and layer.dispatcher.backend == backend
    assert layer.dispatcher.fused(CPU, experts) is False
    assert layer.dispatcher.fused(CPU, layer.experts.inner) is (backend == "triton")


def test_offloaded_experts_have_no_fused_path() -> None:
    from moe.offload.runtime import OffloadedExperts

    assert OffloadedExperts.supports_fused is ExpertsBase.supports_fused
    import inspect

    import moe.offload.loader as loader

    assert "backend" not in inspect.getsource(loader.load).split("OffloadedExperts(")[1]


def test_local_dispatcher_run_is_dispatch_experts_combine() -> None:
    torch.manual_seed(0)
    experts = Experts(4, 8, 6, backend="reference")
    d = LocalDispatcher(4, "reference")
    x = torch.randn(9, 8)
    ids = torch.randint(0, 4, (9, 2))
    routing = Routing(ids, torch.rand(9, 2))
    x_sorted, counts, state = d.dispatch(x, routing)
    want = d.combine(experts(x_sorted, counts), state)
    y, side = d.run(x, routing, experts, overlap=lambda t: 2 * t)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(side, 2 * x)


def test_expert_mlp_grouped_equals_one_expert_at_a_time() -> None:
    torch.manual_seed(0)
    for activation, width in (("swiglu", 12), ("gelu", 6)):
        w_in, w_out = torch.randn(3, 8, width), torch.randn(3, 6, 8)
        counts = torch.tensor([2, 0, 3])
        x = torch.randn(5, 8)
        y = expert_mlp(x, w_in, w_out, counts, activation, "reference")
        starts = [0, 2, 2, 5]
        for e in range(3):
            rows = slice(starts[e], starts[e + 1])
            torch.testing.assert_close(y[rows], expert_mlp(x[rows], w_in[e], w_out[e], None, activation))


def test_capacity_dropping_lives_on_the_routing_side() -> None:
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(16, 12)
    layer(x)
    routing = layer.router(x)
    kept, dropped = drop_over_capacity(routing, x, 4, 0.5)
    assert int(dropped) == layer.stats.dropped_tokens > 0
    assert kept.max_copies == 4 * 4 and int((kept.expert_ids >= 0).sum()) == 16 * 2 - int(dropped)


def test_shared_block_written_once_and_old_hook_deprecated() -> None:
    layer = _layer()
    x = torch.randn(4, 12)
    with pytest.warns(DeprecationWarning, match="_shared_output"):
        old = layer._shared_output(x)
    torch.testing.assert_close(old, shared_output(layer.shared_experts, layer.shared_expert_gate, x))
