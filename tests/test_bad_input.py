"""Bad input gets a clear ValueError/TypeError naming the value and the fix."""

from __future__ import annotations

import pytest
import torch

import moe


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_k=0), ValueError, r"top_k must be >= 1, got 0"),
        (dict(top_k=5), ValueError, r"top_k \(5\) must be <= num_experts \(4\)"),
        (dict(num_experts=0, top_k=1), ValueError, r"num_experts must be >= 1, got 0"),
        (dict(dim=8.0), TypeError, r"dim must be an int"),
        (dict(router="bogus"), ValueError, r"router must be one of"),
        (dict(activation="relu"), ValueError, r"activation must be one of"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
        (dict(capacity_factor=-1.0), ValueError, r"capacity_factor must be"),
        (dict(capacity_factor=float("inf")), ValueError, r"capacity_factor must be .* finite"),
        (dict(num_shared_experts=-1), ValueError, r"num_shared_experts must be >= 0"),
        (dict(shared_expert_gate=True), ValueError, r"shared_expert_gate=True needs num_shared_experts"),
        (dict(router="aux_free", n_group=3), ValueError, r"num_experts \(4\) must be divisible by n_group \(3\)"),
        (dict(router="aux_free", n_group=2, topk_group=3), ValueError, r"topk_group \(3\) must be <= n_group \(2\)"),
        (dict(router="topk", n_group=2), TypeError, r"unknown option\(s\) \['n_group'\] for router 'topk'"),
        (dict(router="topk", aux_loss_coef=-1.0), ValueError, r"aux_loss_coef must be >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs: dict, error: type, match: str) -> None:
    args = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2) | kwargs
    with pytest.raises(error, match=match):
        moe.MoE(**args)


def test_dim_mismatch() -> None:
    with pytest.raises(ValueError, match=r"last dim must be dim=8, got shape \(3, 5\)"):
        moe.MoE(8, 16, 4, 2)(torch.randn(3, 5))


def test_integer_input() -> None:
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        moe.MoE(8, 16, 4, 2)(torch.ones(3, 8, dtype=torch.int64))


def test_dtype_mismatch_names_the_fix() -> None:
    with pytest.raises(TypeError, match=r"layer.to\(torch.float64\)"):
        moe.MoE(8, 16, 4, 2)(torch.randn(3, 8, dtype=torch.float64))


def test_mixed_devices() -> None:
    layer = moe.MoE(8, 16, 4, 2).to("meta")
    with pytest.raises(ValueError, match="input is on cpu but the layer's parameters are on meta"):
        layer(torch.randn(3, 8))


def test_bad_token_mask() -> None:
    with pytest.raises(ValueError, match="token_mask must be bool of shape"):
        moe.MoE(8, 16, 4, 2)(torch.randn(3, 8), token_mask=torch.ones(4, dtype=torch.bool))


def test_router_module_must_be_a_router() -> None:
    with pytest.raises(TypeError, match="must subclass moe.routing.Router"):
        moe.MoE(8, 16, 4, 2, router=torch.nn.Linear(8, 4))


def test_unknown_backend_on_device() -> None:
    from moe import ops

    with pytest.raises(ValueError, match="backend 'nope' cannot run grouped_mm"):
        ops.resolve("grouped_mm", "nope", torch.device("cpu"))


class _FixedRouter(moe.Router):
    """A user's router returning whatever it was given (for the Routing checks)."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor | None = None, **routing: object) -> None:
        super().__init__()
        self.num_experts, self.top_k = 4, ids.shape[1]
        self.ids, self.weights, self.routing = ids, weights, routing

    def forward(self, x_TD: torch.Tensor, token_mask: object = None, seq_len: object = None) -> moe.Routing:
        weights = torch.ones(self.ids.shape) if self.weights is None else self.weights
        return moe.Routing(self.ids, weights, **self.routing)  # type: ignore[arg-type]


def test_custom_router_routing_defaults_and_checks() -> None:
    x = torch.randn(5, 8)
    ids = torch.tensor([[0], [1], [2], [3], [1]])
    # No max_copies given: it defaults to T * K (it was 0, which failed deep in a GEMM).
    y = moe.MoE(8, 16, 4, 1, router=_FixedRouter(ids))(x)
    assert y.shape == (5, 8) and torch.isfinite(y).all()
    cases = [
        (_FixedRouter(ids + 2), ValueError, r"expert_ids must be in \[-1, 4\), got values in \[2, 5\]"),
        (_FixedRouter(ids.int()), TypeError, "int64"),
        (_FixedRouter(ids[:3]), ValueError, r"\[T=5, K\]"),
        (_FixedRouter(ids, torch.ones(5, 2)), ValueError, "shaped like expert_ids"),
        (_FixedRouter(ids, max_copies=0), ValueError, "max_copies must be >= 1"),
    ]
    for router, error, message in cases:
        with pytest.raises(error, match=message):
            moe.MoE(8, 16, 4, 1, router=router)(x)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_negative_counts_and_odd_swiglu_widths_are_clear_errors(backend: str) -> None:
    from moe import ops

    if backend not in ops.backends_for("grouped_mm", torch.device("cpu")):
        pytest.skip(f"backend {backend} not available here")
    x, w = torch.randn(5, 3), torch.randn(3, 3, 4)
    with pytest.raises(ValueError, match=r"counts\[1\] = -1 is negative"):
        ops.grouped_mm(x, w, torch.tensor([3, -1, 2]), backend)
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(4, 5), backend)
