"""The reference ops against hand-written expectations (they are the oracle for fast paths)."""

from __future__ import annotations

import torch

from moe import ops, reference


def test_count_tokens_skips_dropped() -> None:
    ids = torch.tensor([[0, 2], [2, -1], [3, 2]])
    assert reference.count_tokens(ids, 5).tolist() == [1, 0, 3, 1, 0]


def test_sort_by_expert_is_stable_with_dropped_last() -> None:
    ids = torch.tensor([2, -1, 0, 2, 1, -1, 0])
    order, counts = reference.sort_by_expert(ids, 3)
    assert order.tolist() == [2, 6, 4, 0, 3, 1, 5]
    assert counts.tolist() == [2, 1, 2]


def test_sort_by_expert_empty() -> None:
    order, counts = reference.sort_by_expert(torch.zeros(0, dtype=torch.int64), 4)
    assert order.numel() == 0 and counts.tolist() == [0, 0, 0, 0]


def test_permute_unpermute_roundtrip_sums_weighted_copies() -> None:
    x = torch.randn(3, 4)
    token_idx = torch.tensor([2, 0, 0, 1])
    w = torch.tensor([0.5, 0.25, 0.75, 1.0])
    xs = reference.permute(x, token_idx)
    assert torch.equal(xs, x[[2, 0, 0, 1]])
    y = reference.unpermute(xs, token_idx, w, 3)
    torch.testing.assert_close(y, torch.stack([x[0], x[1], 0.5 * x[2]]))


def test_unpermute_accumulates_in_fp32() -> None:
    # In bf16, 1 + 2^-8 rounds back to 1 at each step; summed in fp32 the two halves survive.
    y = torch.tensor([[1.0], [2.0**-8], [2.0**-8]], dtype=torch.bfloat16)
    out = reference.unpermute(y, torch.tensor([0, 0, 0]), torch.ones(3), 1)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0 + 2.0**-7


def test_grouped_mm_matches_per_segment_matmul_and_zero_tail() -> None:
    x = torch.randn(9, 5, dtype=torch.float64)
    w = torch.randn(3, 5, 7, dtype=torch.float64)
    counts = torch.tensor([2, 0, 4])  # expert 1 empty, rows 6..8 are padding
    y = reference.grouped_mm(x, w, counts)
    torch.testing.assert_close(y[:2], x[:2] @ w[0])
    torch.testing.assert_close(y[2:6], x[2:6] @ w[2])
    assert torch.all(y[6:] == 0)


def test_grouped_mm_op_gradients_match_reference_autograd() -> None:
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 1])
    torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, counts, "reference"), (x, w))
    dy = torch.randn(10, 3, dtype=torch.float64)
    dw = reference.grouped_mm_wgrad(x.detach(), dy, counts)
    expected = torch.stack(
        [x[:3].T @ dy[:3], torch.zeros(6, 3, dtype=torch.float64), x[3:8].T @ dy[3:8], x[8:9].T @ dy[8:9]]
    )
    torch.testing.assert_close(dw, expected)


def test_grouped_mm_rejects_counts_beyond_rows() -> None:
    import pytest

    with pytest.raises(ValueError, match="counts sum to 5"):
        reference.grouped_mm(torch.randn(4, 2), torch.randn(1, 2, 2), torch.tensor([5]))


def test_grouped_mm_opcheck() -> None:
    x = torch.randn(7, 4, requires_grad=True)
    w = torch.randn(3, 4, 5, requires_grad=True)
    counts = torch.tensor([2, 0, 4])
    torch.library.opcheck(torch.ops.moe_ref.grouped_mm.default, (x, w, counts))


def test_backward_formulas_match_autograd_and_differentiate_again() -> None:
    """reference.swiglu_backward / unpermute_backward (what the C++ backend uses under create_graph)."""
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, dtype=torch.float64)
    (expected,) = torch.autograd.grad(reference.swiglu(h), h, g)
    torch.testing.assert_close(reference.swiglu_backward(h, g), expected)
    assert torch.autograd.gradcheck(lambda a: reference.swiglu_backward(a, g), (h,))
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 1, 0, 3, 2])
    grad = torch.randn(4, 3, dtype=torch.float64)
    expected_y, expected_w = torch.autograd.grad(reference.unpermute(y, idx, w, 4), (y, w), grad)
    got_y, got_w = reference.unpermute_backward(grad, y, idx, w)
    torch.testing.assert_close(got_y, expected_y)
    torch.testing.assert_close(got_w, expected_w)
