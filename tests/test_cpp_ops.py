"""The C++ ops (moe._C, backend "cpp") against moe.reference: forward, every gradient, opcheck.

Skipped as a whole when the extension is not built (pip install --no-build-isolation -e .).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPES, assert_close

import moe
from moe import reference
from moe.ops import cpp

pytest.importorskip("moe._C", reason="the C++ extension is not built")
assert cpp.loaded()  # registers the fake kernels and autograd formulas

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = torch.ops.moe
POOL_CONTROL = {"buffer_pool_stats", "set_buffer_pool_limit", "empty_pooled"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _routing(num_tokens: int, top_k: int, num_experts: int, drop: float = 0.0) -> torch.Tensor:
    """expert_ids [T, K], distinct experts per token where possible, a fraction `drop` set to -1."""
    ids = torch.rand(num_tokens, num_experts).argsort(dim=1)[:, :top_k] % num_experts
    if top_k > num_experts:
        ids = torch.randint(num_experts, (num_tokens, top_k))
    return torch.where(torch.rand(ids.shape) < drop, -1, ids)


def _sorted_rows(num_tokens: int, top_k: int, num_experts: int, drop: float = 0.0) -> tuple[torch.Tensor, ...]:
    """(token_idx [N], counts [E]) as the dispatcher makes them."""
    order, counts = reference.sort_by_expert(_routing(num_tokens, top_k, num_experts, drop), num_experts)
    return order // top_k, counts


# ---------------------------------------------------------------- index ops (exact)


@pytest.mark.parametrize(("t", "k", "e"), [(0, 2, 4), (1, 1, 1), (7, 2, 3), (100, 4, 5), (33, 3, 64)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_sort_by_expert_is_exact(t: int, k: int, e: int, drop: float) -> None:
    ids = _routing(t, k, e, drop)
    order, counts = cpp.sort_by_expert(ids, e)
    want_order, want_counts = reference.sort_by_expert(ids, e)
    assert torch.equal(order, want_order) and torch.equal(counts, want_counts)
    assert order.dtype == counts.dtype == torch.int64


def test_align_block_size_pads_each_segment() -> None:
    counts = torch.tensor([0, 1, 4, 5, 9])
    got = OPS.align_block_size(counts, 4)
    want = F.pad(torch.cumsum((counts + 3) // 4 * 4, 0), (1, 0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "k", "e", "d"), [(0, 2, 4, 8), (1, 2, 4, 3), (37, 3, 5, 20)])
def test_permute_forward_exact_and_gradient(dtype: torch.dtype, t: int, k: int, e: int, d: int) -> None:
    token_idx, _ = _sorted_rows(t, k, e)
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = cpp.permute(x, token_idx), reference.permute(x_ref, token_idx)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)


def test_permute_of_non_contiguous_input() -> None:
    x = torch.randn(6, 10).t()  # [10, 6], column-major
    idx = torch.tensor([9, 0, 0, 4])
    assert torch.equal(cpp.permute(x, idx), x[idx])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_is_the_adjoint_of_permute(dtype: torch.dtype) -> None:
    token_idx, _ = _sorted_rows(20, 3, 6)
    y = torch.randn(60, 7, dtype=dtype)
    want = torch.zeros(20, 7, dtype=torch.float64).index_add(0, token_idx, y.double())
    assert_close(OPS.scatter_rows(y, token_idx, 20), want, dtype)


# ---------------------------------------------------------------- unpermute


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "k", "e", "d", "drop"), [(0, 2, 4, 8, 0.0), (1, 1, 1, 5, 0.0), (41, 3, 6, 24, 0.3)])
def test_unpermute_forward_and_gradients(dtype: torch.dtype, t: int, k: int, e: int, d: int, drop: float) -> None:
    token_idx, counts = _sorted_rows(t, k, e, drop)
    n = token_idx.shape[0]
    routed = torch.arange(n) < counts.sum()
    y = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = torch.where(routed, torch.rand(n), 0.0).requires_grad_()
    y_ref, w_ref = (y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_())
    out, out_ref = cpp.unpermute(y, token_idx, w, t), reference.unpermute(y_ref, token_idx, w_ref, t)
    assert out.dtype == dtype
    assert_close(out, out_ref)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    assert_close(y.grad, y_ref.grad)
    assert_close(w.grad, w_ref.grad, dtype)


@pytest.mark.parametrize("d", [1, 7, 8, 33, 1027])
def test_unpermute_fp32_has_index_adds_bits(d: int) -> None:
    """fp32 rows are summed in the output row, vectorised (AVX2 where the CPU has it, no FMA):
    the bits must still be those of index_add, which adds each product in ascending row order."""
    token_idx, _ = _sorted_rows(50, 3, 7)
    y, w = torch.randn(150, d), torch.rand(150)
    want = torch.zeros(50, d).index_add(0, token_idx, y * w[:, None])
    assert torch.equal(cpp.unpermute(y, token_idx, w, 50), want)
    assert torch.equal(OPS.scatter_rows(y, token_idx, 50), torch.zeros(50, d).index_add(0, token_idx, y))


def test_unpermute_is_deterministic() -> None:
    token_idx, _ = _sorted_rows(64, 4, 8)
    y, w = torch.randn(256, 33), torch.rand(256)
    torch.set_num_threads(2)
    outs = [cpp.unpermute(y, token_idx, w, 64) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)


# ---------------------------------------------------------------- grouped_mm


def _grouped_inputs(counts: list[int], pad: int, k: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    c = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(c.sum()) + pad, k, dtype=dtype)
    w = torch.randn(len(counts), k, n, dtype=dtype) / k**0.5
    return x, w, c


GROUPED_CASES = [([0, 0], 0), ([3], 0), ([5, 0, 2, 0], 3), ([1, 7, 0, 4, 2], 0), ([0, 0, 0], 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("counts", "pad"), GROUPED_CASES)
def test_grouped_mm_forward_and_gradients(dtype: torch.dtype, counts: list[int], pad: int) -> None:
    x, w, c = _grouped_inputs(counts, pad, 12, 10, dtype)
    x.requires_grad_()
    w.requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, y_ref = cpp.grouped_mm(x, w, c), reference.grouped_mm(x_ref, w_ref, c)
    assert_close(y, y_ref)
    assert torch.all(y[int(c.sum()) :] == 0)
    if int(c.sum()) == 0:  # the reference returns a fresh zeros tensor, with no graph
        return
    # Backward through a sum: the upstream gradient arrives expanded (stride 0).
    (y.float() * 1.5).sum().backward()
    (y_ref.float() * 1.5).sum().backward()
    assert_close(x.grad, x_ref.grad)
    assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("n", [130, 257])
def test_grouped_mm_column_split_across_threads(n: int) -> None:
    """Too few rows to split by rows: 2 threads each own a column block of every expert (>= 64 columns)."""
    torch.set_num_threads(2)
    x, w, c = _grouped_inputs([5, 0, 9, 2], 3, 70, n, torch.float32)
    dy = torch.randn(x.shape[0], n)
    assert_close(cpp.grouped_mm(x, w, c), reference.grouped_mm(x, w, c))
    assert_close(OPS.grouped_mm(dy, w.transpose(1, 2), c), reference.grouped_mm(dy, w.transpose(1, 2), c))
    assert_close(OPS.grouped_mm_wgrad(x, dy, c), reference.grouped_mm_wgrad(x, dy, c))


def test_grouped_mm_wgrad_matches_reference() -> None:
    x, _, c = _grouped_inputs([4, 0, 6], 2, 9, 1, torch.float32)
    dy = torch.randn(x.shape[0], 5)
    assert_close(OPS.grouped_mm_wgrad(x, dy, c), reference.grouped_mm_wgrad(x, dy, c))


# Enough rows for several threads (>= 32 each): thread ranges cut experts (those parts split dW by
# columns, cut at multiples of 16 of 33), one expert spans more than a thread's range, some have none.
SPLIT_COUNTS = [70, 0, 13, 150, 1, 0, 40]
# Cuts that would leave an expert fewer than 32 rows move to its edge: at 2 threads row 99 would
# leave expert 2 (rows 60-105) 6 rows, at 3 threads rows 66 and 132 leave 6 and 27.
SLIVER_COUNTS = [60, 0, 45, 40, 3, 50]


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("counts", [SPLIT_COUNTS, SLIVER_COUNTS])
def test_grouped_mm_split_over_threads(threads: int, counts: list[int]) -> None:
    torch.set_num_threads(threads)
    x, w, c = _grouped_inputs(counts, 5, 20, 33, torch.float64)
    dy = torch.randn(x.shape[0], 33, dtype=torch.float64)
    torch.testing.assert_close(cpp.grouped_mm(x, w, c), reference.grouped_mm(x, w, c))
    dx = OPS.grouped_mm(dy, w.transpose(1, 2), c)
    torch.testing.assert_close(dx, reference.grouped_mm(dy, w.transpose(1, 2), c))
    torch.testing.assert_close(OPS.grouped_mm_wgrad(x, dy, c), reference.grouped_mm_wgrad(x, dy, c))


# ---------------------------------------------------------------- swiglu_grouped_mm (fused)


def _swiglu_mm_inputs(counts: list[int], pad: int, h: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    c = torch.tensor(counts, dtype=torch.int64)
    hs = torch.randn(int(c.sum()) + pad, 2 * h, dtype=dtype)
    hs[int(c.sum()) :] = 0  # padding rows of h are 0, as grouped_mm leaves them
    w = torch.randn(len(counts), h, d, dtype=dtype) / h**0.5
    return hs, w, c


# Few rows run on one thread; SPLIT_COUNTS splits the rows over 2 and 3 threads.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("counts", "pad"), [([5, 0, 2, 3], 3), ([4, 0, 7, 1, 3, 0, 2, 9, 5], 2), ([0, 0, 0, 0], 2), (SPLIT_COUNTS, 4)]
)
def test_swiglu_grouped_mm_forward_and_gradients(threads: int, dtype: torch.dtype, counts: list[int], pad: int) -> None:
    torch.set_num_threads(threads)
    h, w, c = _swiglu_mm_inputs(counts, pad, 70, 33, dtype)
    h.requires_grad_()
    w.requires_grad_()
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = cpp.swiglu_grouped_mm(h, w, c)
    y_ref = reference.grouped_mm(reference.swiglu(h_ref), w_ref, c)
    assert_close(y, y_ref)
    assert torch.all(y[int(c.sum()) :] == 0)
    if int(c.sum()) == 0:  # the reference returns a fresh zeros tensor, with no graph
        return
    (y.float() * 1.5).sum().backward()  # the upstream gradient arrives expanded (stride 0)
    (y_ref.float() * 1.5).sum().backward()
    assert_close(h.grad, h_ref.grad)
    assert_close(w.grad, w_ref.grad)
    assert torch.all(h.grad[int(c.sum()) :] == 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("counts", [[3, 1, 0, 4, 2], SPLIT_COUNTS])
def test_swiglu_grouped_mm_frozen_weights_skip_the_weight_gradient(threads: int, counts: list[int]) -> None:
    torch.set_num_threads(threads)
    h, w, c = _swiglu_mm_inputs(counts, 1, 8, 6, torch.float64)
    h.requires_grad_()
    g = torch.randn(h.shape[0], 6, dtype=torch.float64)
    grad_h, grad_w = OPS.swiglu_grouped_mm_backward(g, h.detach(), w, c, False)
    assert grad_w.numel() == 0
    cpp.swiglu_grouped_mm(h, w, c).backward(g)
    assert w.grad is None
    torch.testing.assert_close(h.grad, grad_h)
    want = torch.autograd.functional.vjp(lambda t: reference.grouped_mm(reference.swiglu(t), w, c), h.detach(), g)[1]
    torch.testing.assert_close(grad_h, want)


def test_swiglu_grouped_mm_gradcheck_and_double_backward_fp64() -> None:
    torch.set_num_threads(2)
    for counts in ([2, 0, 3], [1, 2, 0, 1, 1]):  # experts one after another, and whole experts per thread
        h, w, c = _swiglu_mm_inputs(counts, 1, 3, 4, torch.float64)
        h.requires_grad_()
        w.requires_grad_()

        def fn(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
            return cpp.swiglu_grouped_mm(a, b, c)

        assert torch.autograd.gradcheck(fn, (h, w))
        assert torch.autograd.gradgradcheck(fn, (h, w))


# ---------------------------------------------------------------- swiglu_experts (fused expert MLP)


def _experts_inputs(counts: list[int], pad: int, d: int, h: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    c = torch.tensor(counts, dtype=torch.int64)
    x = torch.randn(int(c.sum()) + pad, d, dtype=dtype)
    w_in = torch.randn(len(counts), d, 2 * h, dtype=dtype) / d**0.5
    w_out = torch.randn(len(counts), h, d, dtype=dtype) / h**0.5
    return x, w_in, w_out, c


def _experts_reference(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return reference.grouped_mm(reference.swiglu(reference.grouped_mm(x, w_in, c)), w_out, c)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("counts", "pad"), [([5, 0, 2, 3], 3), (SPLIT_COUNTS, 4), (SLIVER_COUNTS, 1), ([0, 0, 0], 2)])
def test_swiglu_experts_forward_and_gradients(threads: int, dtype: torch.dtype, counts: list[int], pad: int) -> None:
    """Parts of experts two threads share (SPLIT_COUNTS) take the shared-rows path of dW_in. bf16 is
    compared with the two separate C++ ops it replaces (the reference rounds to bf16 after every op,
    and dW_in's sums of ~100 rows reach 144, where bf16's spacing is 1)."""
    torch.set_num_threads(threads)
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in _experts_inputs(counts, pad, 33, 24, dtype)]
    refs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y = cpp.swiglu_experts(*inputs)
    if dtype == torch.bfloat16:
        x, w_in, w_out, c = refs
        y_ref = cpp.swiglu_grouped_mm(cpp.grouped_mm(x, w_in, c), w_out, c)
    else:
        y_ref = _experts_reference(*refs)
    assert_close(y, y_ref)
    used = int(sum(counts))
    assert torch.all(y[used:] == 0)
    if used == 0:  # the reference returns a fresh zeros tensor, with no graph
        return
    (y.float() * 1.5).sum().backward()  # the upstream gradient arrives expanded (stride 0)
    (y_ref.float() * 1.5).sum().backward()
    for got, want in zip(inputs[:3], refs[:3], strict=True):
        assert_close(got.grad, want.grad)
    assert torch.all(inputs[0].grad[used:] == 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, True), (False, True, False), (True, False, True)]
)
def test_swiglu_experts_computes_only_the_gradients_asked_for(threads: int, needs: tuple[bool, bool, bool]) -> None:
    torch.set_num_threads(threads)
    x, w_in, w_out, c = _experts_inputs(SPLIT_COUNTS, 2, 20, 16, torch.float64)
    g = torch.randn(x.shape[0], 20, dtype=torch.float64)
    got = OPS.swiglu_experts_backward(g, x, OPS.grouped_mm(x, w_in, c), w_in, w_out, c, list(needs))
    want = torch.autograd.functional.vjp(lambda *t: _experts_reference(*t, c), (x, w_in, w_out), g)[1]
    for need, a, b in zip(needs, got, want, strict=True):
        if need:
            torch.testing.assert_close(a, b)
        else:
            assert a.numel() == 0
    for t, need in zip((x, w_in, w_out), needs, strict=True):
        t.requires_grad_(need)
    cpp.swiglu_experts(x, w_in, w_out, c).backward(g)
    for t, need, b in zip((x, w_in, w_out), needs, want, strict=True):
        assert (t.grad is not None) == need
        if need:
            torch.testing.assert_close(t.grad, b)


def test_swiglu_experts_gradcheck_and_double_backward_fp64() -> None:
    torch.set_num_threads(2)
    for counts in ([2, 0, 3], [40, 0, 30, 3]):  # one thread; rows split over two (expert 0 shared)
        x, w_in, w_out, c = (
            t.requires_grad_() if t.is_floating_point() else t for t in _experts_inputs(counts, 1, 3, 2, torch.float64)
        )

        def fn(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
            return cpp.swiglu_experts(a, b, d, c)

        assert torch.autograd.gradcheck(fn, (x, w_in, w_out))
        assert torch.autograd.gradgradcheck(fn, (x, w_in, w_out))


@pytest.mark.parametrize("backend", ["cpp", "reference", "torch", "auto"])
def test_ops_swiglu_experts_matches_the_two_gemms(backend: str) -> None:
    """moe.ops.swiglu_experts takes the fused op only where swiglu and grouped_mm are cpp's."""
    x, w_in, w_out, c = _experts_inputs([3, 0, 5], 2, 8, 16, torch.float32)
    assert_close(moe.ops.swiglu_experts(x, w_in, w_out, c, backend), _experts_reference(x, w_in, w_out, c))


@pytest.mark.parametrize("backend", ["cpp", "reference", "torch", "auto"])
def test_ops_swiglu_grouped_mm_matches_the_two_ops(backend: str) -> None:
    """moe.ops.swiglu_grouped_mm takes the fused op only where swiglu and grouped_mm are cpp's."""
    h, w, c = _swiglu_mm_inputs([3, 0, 5], 2, 16, 8, torch.float32)
    want = reference.grouped_mm(reference.swiglu(h), w, c)
    assert_close(moe.ops.swiglu_grouped_mm(h, w, c, backend), want)


def test_grouped_mm_double_backward_fp64() -> None:
    x, w, c = _grouped_inputs([2, 0, 3], 1, 4, 3, torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: cpp.grouped_mm(a, b, c), (x, w))


def test_permute_unpermute_gradcheck_fp64() -> None:
    token_idx, _ = _sorted_rows(5, 2, 3)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cpp.unpermute(cpp.permute(a, token_idx) ** 2, token_idx, b, 5), (x, w))
    assert torch.autograd.gradgradcheck(lambda a: cpp.permute(a, token_idx), (x,))


def test_unpermute_and_swiglu_double_backward_fp64() -> None:
    """Their backward kernels have no autograd: under create_graph the formulas take over."""
    token_idx, _ = _sorted_rows(5, 2, 3)
    y = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: cpp.unpermute(a, token_idx, b, 5), (y, w))
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(cpp.swiglu, (h,))


def test_layer_double_backward_matches_reference() -> None:
    import moe

    torch.manual_seed(0)
    layers = {b: moe.MoE(6, 5, 4, 2, backend=b).double() for b in ("reference", "cpp", "torch")}
    for b in ("cpp", "torch"):
        layers[b].load_state_dict(layers["reference"].state_dict())
    second = {}
    for b, layer in layers.items():
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        # An input-gradient penalty and a weight-gradient penalty (through dW: the wgrad op's own backward).
        g_x, g_w = torch.autograd.grad(layer(x).pow(2).sum(), (x, layer.experts.w_out), create_graph=True)
        second[b] = torch.autograd.grad(g_x.pow(2).sum() + g_w.pow(2).sum(), x)[0]
    assert_close(second["cpp"], second["reference"])
    assert_close(second["torch"], second["reference"])


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "h"), [(0, 4), (1, 1), (9, 300), (3, 37)])
def test_swiglu_forward_and_gradient(dtype: torch.dtype, n: int, h: int) -> None:
    x = (3 * torch.randn(n, 2 * h)).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = cpp.swiglu(x), reference.swiglu(x_ref)
    assert y.shape == (n, h) and y.dtype == dtype
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)


def test_swiglu_extreme_inputs() -> None:
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("nan")])
    h = torch.cat([gate, torch.ones(8)]).unsqueeze(0)
    want = reference.swiglu(h)
    got = cpp.swiglu(h)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-30)
    g = torch.ones(1, 8)
    torch.testing.assert_close(
        OPS.swiglu_backward(g, h)[0, :7],
        torch.autograd.functional.vjp(reference.swiglu, h, g)[1][0, :7],
        rtol=1e-5,
        atol=1e-30,
    )


# ---------------------------------------------------------------- opcheck


def _opcheck_cases() -> list[tuple[str, tuple]]:
    token_idx, counts = _sorted_rows(6, 2, 3)
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.randn(12, 5, requires_grad=True)
    w = torch.rand(12, requires_grad=True)
    xs, ws, c = _grouped_inputs([3, 0, 4], 2, 6, 5, torch.float32)
    return [
        ("sort_by_expert", (_routing(6, 2, 3, 0.3).reshape(-1), 3)),
        ("align_block_size", (counts, 4)),
        ("permute", (x, token_idx)),
        ("scatter_rows", (y, token_idx, 6)),
        ("unpermute", (y, token_idx, w, 6)),
        ("unpermute_backward", (torch.randn(6, 5), y.detach(), token_idx, w.detach())),
        ("grouped_mm", (xs.requires_grad_(), ws.requires_grad_(), c)),
        ("grouped_mm_wgrad", (xs.detach().requires_grad_(), torch.randn(9, 4, requires_grad=True), c)),
        ("swiglu", (torch.randn(4, 10, requires_grad=True),)),
        ("swiglu_backward", (torch.randn(4, 5), torch.randn(4, 10))),
        ("swiglu_grouped_mm", (torch.randn(9, 8, requires_grad=True), torch.randn(3, 4, 5, requires_grad=True), c)),
        ("swiglu_grouped_mm_backward", (torch.randn(9, 5), torch.randn(9, 8), torch.randn(3, 4, 5), c, True)),
        (
            "swiglu_experts",
            tuple(
                t.requires_grad_() if t.is_floating_point() else t
                for t in _experts_inputs([3, 0, 4], 2, 6, 4, torch.float32)
            ),
        ),
        (
            "swiglu_experts_backward",
            (
                torch.randn(9, 6),
                torch.randn(9, 6),
                torch.randn(9, 8),
                torch.randn(3, 6, 8),
                torch.randn(3, 4, 6),
                c,
                [True, True, False],
            ),
        ),
        # int4 (int8 and the forward / gradient tests: tests/test_quant_matmul.py)
        ("quant_matmul", (torch.randn(3, 64, requires_grad=True), *_int4_weight())),
    ]


def _int4_weight() -> tuple:
    from moe.quant import quantize

    q = quantize(torch.randn(1, 64, 20), "int4", 32)
    assert q.zero is not None
    return q.data[0], q.scale[0], q.zero[0], 32


@pytest.mark.parametrize(("name", "args"), _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name: str, args: tuple) -> None:
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_every_schema_has_a_cpu_kernel_and_is_opchecked() -> None:
    names = {n for n, _ in _opcheck_cases()}
    defined = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("moe::")}
    assert defined - POOL_CONTROL == names  # the pool's ops take no tensor (tests/test_buffer_pool.py)
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{n}", "CPU") for n in names)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: OPS.sort_by_expert(torch.tensor([0, 3]), 3), ValueError, r"expert_ids\[1\] = 3 is out of range"),
        (lambda: OPS.sort_by_expert(torch.tensor([0, 1]), 0), ValueError, "num_experts must be positive, got 0$"),
        (lambda: OPS.sort_by_expert(torch.tensor([0, 1], dtype=torch.int32), 2), TypeError, "must be int64"),
        (lambda: OPS.permute(torch.randn(3, 2), torch.tensor([0, 3])), ValueError, r"token_idx\[1\] = 3"),
        (lambda: OPS.permute(torch.randn(3, 2), torch.tensor([-1])), ValueError, "out of range"),
        (lambda: OPS.permute(torch.randn(3), torch.tensor([0])), ValueError, r"x must be \[T, D\], got shape \[3\]$"),
        (lambda: OPS.unpermute(torch.randn(2, 4), torch.tensor([0, 1]), torch.rand(3), 2), ValueError, "weights"),
        (lambda: OPS.unpermute(torch.randn(2, 4), torch.tensor([0, 5]), torch.rand(2), 2), ValueError, "out of range"),
        (lambda: OPS.grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), torch.tensor([2, 2])), ValueError, "sum to 4"),
        (lambda: OPS.grouped_mm(torch.randn(3, 4), torch.randn(2, 5, 5), torch.tensor([1, 1])), ValueError, "K = 5"),
        (lambda: OPS.grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), torch.tensor([1])), ValueError, "experts"),
        (
            lambda: OPS.grouped_mm(torch.randn(3, 4), torch.randn(1, 4, 5).double(), torch.tensor([1])),
            TypeError,
            "but w is",
        ),
        (
            lambda: OPS.grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5), torch.tensor([2, -1])),
            ValueError,
            "negative",
        ),
        (lambda: OPS.swiglu(torch.randn(2, 5)), ValueError, "even number of columns"),
        (
            lambda: OPS.swiglu_experts(
                torch.randn(3, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 5), torch.tensor([1, 1])
            ),
            ValueError,
            r"w_out must be \[E, H, D\] = \[2, 3, 4\], got shape \[2, 3, 5\]",
        ),
        (
            lambda: OPS.swiglu_experts(
                torch.randn(3, 4), torch.randn(2, 5, 6), torch.randn(2, 3, 4), torch.tensor([1, 1])
            ),
            ValueError,
            r"x must be \[N, D\] and w_in \[E, D, 2H\]",
        ),
        (lambda: OPS.swiglu(torch.ones(2, 4, dtype=torch.int64)), TypeError, "floating"),
        (lambda: OPS.swiglu_backward(torch.randn(2, 3), torch.randn(2, 4)), ValueError, r"grad_out must be \[N, H\]"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------- the layer


def _layer_pair(shape: tuple[int, ...], **options: object) -> tuple[moe.MoE, moe.MoE]:
    _, d, h, e, k = shape
    torch.manual_seed(1)
    ours = moe.MoE(d, h, e, k, backend="cpp", **options)  # type: ignore[arg-type]
    ref = moe.MoE(d, h, e, k, backend="reference", **options)  # type: ignore[arg-type]
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"capacity_factor": 0.5}, {"activation": "gelu", "num_shared_experts": 1}],
    ids=["dropless", "capacity", "gelu_shared"],
)
def test_layer_cpp_matches_reference(shape: tuple[int, ...], options: dict) -> None:
    ours, ref = _layer_pair(shape, **options)
    x = torch.randn(shape[0], shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p_ref.grad is not None, name
        assert_close(p.grad, p_ref.grad)


def test_layer_cpp_two_threads_with_grads() -> None:
    """The column split runs GEMMs on worker threads, on inputs that require grad."""
    torch.set_num_threads(2)
    ours, ref = _layer_pair((40, 24, 160, 4, 2))
    x = torch.randn(40, 24, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    assert_close(y, y_ref)
    y.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    y_ref.square().sum().backward()
    assert_close(gx, x.grad)
    assert_close(ours.experts.w_in.grad, ref.experts.w_in.grad)
    assert_close(ours.experts.w_out.grad, ref.experts.w_out.grad)


def test_layer_cpp_bf16_close_to_fp32() -> None:
    ours, ref = _layer_pair((16, 32, 48, 4, 2))
    x = torch.randn(16, 32)
    y16 = ours.to(torch.bfloat16)(x.bfloat16())
    assert_close(y16.float(), ref(x), torch.bfloat16)


def test_auto_picks_cpp_on_cpu() -> None:
    for op in ("sort_by_expert", "permute", "unpermute", "grouped_mm", "swiglu"):
        assert moe.ops.backends_for(op, torch.device("cpu"))[0] == "cpp"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("moe::permute", "CUDA"):
        assert "cpp" not in moe.ops.backends_for("permute", torch.device("cuda"))


def test_compiled_cpp_layer_fullgraph() -> None:
    """One graph through the C++ ops (fake kernels + autograd); aot_eager skips codegen time."""
    torch._dynamo.reset()
    ours, _ = _layer_pair((9, 16, 32, 4, 2))
    x = torch.randn(9, 16, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    yc = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(x.grad, gx)


def test_missing_extension_warns_once_and_falls_back() -> None:
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["moe._C"] = None  # what an unbuilt checkout looks like
        import torch, moe
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = moe.MoE(8, 16, 4, 2)
            layer(torch.randn(5, 8)).sum().backward()
            layer(torch.randn(5, 8))
        msgs = [str(w.message) for w in caught if "moe._C" in str(w.message)]
        assert len(msgs) == 1 and "pip install" in msgs[0], msgs
        assert "cpp" not in moe.ops.backends_for("grouped_mm", torch.device("cpu"))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_reference_layer_runs_only_reference_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="reference" is the oracle: it must not pick up the C++ fused SwiGLU."""
    from moe.ops import registry

    def refuse(*args: object) -> None:
        raise AssertionError("the reference layer called a C++ op")

    for op in registry.OPS:
        if (op, "cpp") in registry._IMPLS:
            monkeypatch.setitem(registry._IMPLS, (op, "cpp"), (refuse, registry._IMPLS[(op, "cpp")][1]))
    layer = moe.MoE(8, 16, 4, 2, backend="reference")
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
