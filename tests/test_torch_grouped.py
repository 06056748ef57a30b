"""Backend "torch" (torch._grouped_mm) against the reference grouped_mm: forward, dX, dW."""

from __future__ import annotations

import pytest
import torch

import moe
from moe import ops, reference
from moe.ops import torch_grouped

pytestmark = pytest.mark.skipif(
    not torch_grouped.available(torch.device("cpu")), reason="this torch has no torch._grouped_mm"
)

# The aot_dispatch checks cost ~10 s each here; autograd itself is checked against the reference above.
CHEAP_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")

# counts per case: zero-token experts first, middle and last; one row; padding rows past counts.sum().
CASES = [
    ([3, 0, 5, 2], 12),
    ([0, 4, 0, 0, 7], 11),
    ([1], 1),
    ([2, 0, 0, 6, 0], 9),
    ([0, 0, 0], 4),
]


def _inputs(counts: list[int], rows: int, dtype: torch.dtype, k: int = 8, n: int = 12):
    g = torch.Generator().manual_seed(sum(counts) + rows)
    x = torch.randn(rows, k, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(len(counts), k, n, generator=g).to(dtype).requires_grad_(True)
    return x, w, torch.tensor(counts, dtype=torch.int64)


def _run(fn, x, w, counts, dy):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, counts)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("counts,rows", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_forward_and_grads_match_reference(counts, rows, dtype, tol) -> None:
    torch.set_num_threads(1)
    x, w, c = _inputs(counts, rows, dtype)
    dy = torch.randn(rows, w.shape[2]).to(dtype)
    want = _run(ops.resolve("grouped_mm", "reference", x.device), x, w, c, dy)
    got = _run(torch_grouped.grouped_mm, x, w, c, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=name)
    total = sum(counts)
    assert (got[0][total:] == 0).all() and (got[1][total:] == 0).all()  # padding rows: exact zeros
    for e, n in enumerate(counts):
        if n == 0:
            assert (got[2][e] == 0).all()  # zero-token experts: exact zero weight grads


def test_expanded_grad_and_reference_fallbacks() -> None:
    x, w, c = _inputs([3, 0, 5], 8, torch.float32)
    y = torch_grouped.grouped_mm(x, w, c)
    y.sum().backward()  # the upstream grad is expanded (stride 0): torch._grouped_mm alone rejects it
    want = _run(reference.grouped_mm, x, w, c, torch.ones_like(y))
    torch.testing.assert_close(x.grad, want[1])
    torch.testing.assert_close(w.grad, want[2])
    # fp64 and unaligned widths (N = 6 fp32 = 24-byte rows) run the reference instead.
    for dtype, n in ((torch.float64, 12), (torch.float32, 6)):
        x, w, c = _inputs([2, 3], 6, dtype, n=n)
        torch.testing.assert_close(torch_grouped.grouped_mm(x, w, c), reference.grouped_mm(x, w, c))


def test_too_few_rows_is_a_value_error() -> None:
    x, w, _ = _inputs([2, 2], 3, torch.float32)
    with pytest.raises(ValueError, match="counts sum to 4"):
        torch_grouped.grouped_mm(x, w, torch.tensor([2, 2]))


def test_opcheck() -> None:
    x, w, c = _inputs([3, 0, 5, 2], 12, torch.float32)
    torch.library.opcheck(torch.ops.moe_torch.grouped_mm.default, (x, w, c), test_utils=CHEAP_OPCHECK)
    torch.library.opcheck(
        torch.ops.moe_torch.grouped_mm_wgrad.default, (x.detach(), torch.randn(12, 12), c), test_utils=CHEAP_OPCHECK
    )


def test_layer_with_backend_torch_matches_reference_layer() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = moe.MoE(16, 24, 6, 2, backend="reference")
    layer = moe.MoE(16, 24, 6, 2, backend="torch")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 16)
    outs = []
    for m in (ref, layer):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, m.experts.w_in.grad, m.experts.w_out.grad, m.router.weight.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert "torch" in ops.backends_for("grouped_mm", torch.device("cpu"))


def test_partial_backends_never_hand_an_op_to_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA without moe._C both triton and torch lack permute; each delegated to the other
    (RecursionError). Reproduced on CPU by giving CPU CUDA's priority order without cpp."""
    from moe.ops import registry, triton  # noqa: F401  (registers the triton backend)

    monkeypatch.setitem(registry.AUTO_PRIORITY, "cpu", ("triton", "torch", "reference"))
    x, idx, wts = torch.randn(5, 4), torch.tensor([3, 0, 4, 1]), torch.rand(4)
    for backend in ("triton", "torch"):
        torch.testing.assert_close(ops.permute(x, idx, backend), x[idx])
        torch.testing.assert_close(
            ops.unpermute(x[idx], idx, wts, 5, backend), reference.unpermute(x[idx], idx, wts, 5)
        )
