"""The fused CPU dequantize-GEMM moe::quant_matmul (csrc/quant_matmul_cpu.cpp) against the
reference x @ dequantize(w) of moe.quant: forward, the gradient w.r.t. x, opcheck, bad input.

Skipped as a whole when the C++ extension is not built.
"""

from __future__ import annotations

import pytest
import torch

from moe.ops import cpp
from moe.quant import MATMUL_PATHS, matmul_path, quantize, quantized_matmul, quantized_mlp_one

pytest.importorskip("moe._C", reason="the C++ extension is not built")
assert cpp.loaded()

# (M rows, K inner, N out): M = 0 and 1, non-powers of two, N not a multiple of the 64-column tile.
SHAPES = [(0, 64, 40), (1, 64, 40), (3, 96, 100), (17, 128, 64), (5, 256, 130), (33, 384, 7)]


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: summation order only. bf16: a few ulps of the output's scale (the reference also
    rounds the dequantized weight to bf16, the fused op keeps it in fp32)."""
    scale = float(want.detach().abs().max()) if want.numel() else 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * max(scale, 1.0))


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("scheme", "group"), [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grad_match_dequantize_then_matmul(
    m: int, k: int, n: int, scheme: str, group: int, dtype: torch.dtype
) -> None:
    if scheme == "int4" and k % group:
        pytest.skip("group does not divide K")
    torch.manual_seed(m * 1000 + k + n)
    qw = quantize(torch.randn(1, k, n), scheme, group)
    x = torch.randn(m, k, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = quantized_matmul(x1, qw, path="fused-cpu")
    want = quantized_matmul(x2, qw, path="dequantize-then-matmul")
    assert got.dtype == dtype and got.shape == (m, n)
    _check(got, want, dtype)
    oracle = (x.double() @ qw.dequantize(torch.float64)[0]).to(dtype)  # exact weights, then one rounding
    if dtype == torch.float32:
        _check(got, oracle, dtype)
    else:  # fp32 accumulation then one rounding to bf16: within one bf16 ulp of the fp64 result
        torch.testing.assert_close(got.float(), oracle.float(), rtol=8e-3, atol=1e-3)
    g = torch.randn(m, n, dtype=dtype)
    (got * g).sum().backward()
    (want * g).sum().backward()
    assert x1.grad is not None and x2.grad is not None
    _check(x1.grad, x2.grad, dtype)


def test_int8_k_not_a_multiple_of_the_tile() -> None:
    """int8 with K = 45 (the last 32-row tile is partial), against the fp64 oracle."""
    torch.manual_seed(3)
    qw = quantize(torch.randn(1, 45, 70), "int8")
    x = torch.randn(6, 45)
    oracle = (x.double() @ qw.dequantize(torch.float64)[0]).float()
    torch.testing.assert_close(quantized_matmul(x, qw, path="fused-cpu"), oracle, rtol=1e-5, atol=1e-5)


def test_mlp_and_default_path() -> None:
    assert matmul_path("cpu") == "fused-cpu" and matmul_path("meta") == "dequantize-then-matmul"
    torch.manual_seed(0)
    qi, qo = quantize(torch.randn(1, 64, 64), "int4", 32), quantize(torch.randn(1, 32, 64), "int4", 32)
    x = torch.randn(5, 64)
    ref = (
        torch.nn.functional.silu(x @ qi.dequantize()[0][:, :32]) * (x @ qi.dequantize()[0][:, 32:])
    ) @ qo.dequantize()[0]
    torch.testing.assert_close(quantized_mlp_one(x, qi, qo), ref, rtol=1e-5, atol=1e-5)


def test_opcheck() -> None:
    torch.manual_seed(0)
    q4 = quantize(torch.randn(1, 64, 20), "int4", 32)
    q8 = quantize(torch.randn(1, 40, 20), "int8")
    torch.library.opcheck(
        torch.ops.moe.quant_matmul.default,
        (torch.randn(3, 64, requires_grad=True), q4.data[0], q4.scale[0], q4.zero[0], 32),
    )
    torch.library.opcheck(
        torch.ops.moe.quant_matmul.default, (torch.randn(3, 40, requires_grad=True), q8.data[0], q8.scale[0], None, 40)
    )


def test_bad_input() -> None:
    q4 = quantize(torch.randn(1, 64, 20), "int4", 32)
    q8 = quantize(torch.randn(1, 40, 20), "int8")
    op = torch.ops.moe.quant_matmul
    with pytest.raises(ValueError, match="x must be"):
        quantized_matmul(torch.randn(3, 63), q4)
    with pytest.raises(ValueError, match="path must be one of"):
        quantized_matmul(torch.randn(3, 64), q4, path="fast")
    assert "auto" in MATMUL_PATHS
    with pytest.raises(ValueError, match="group_size 48 must divide K = 64"):
        op(torch.randn(3, 64), q4.data[0], q4.scale[0], q4.zero[0], 48)
    with pytest.raises(ValueError, match=r"scale must be \[2, 20\]"):
        op(torch.randn(3, 64), q4.data[0], q4.scale[0][:1], q4.zero[0][:1], 32)
    with pytest.raises(ValueError, match="zero"):
        op(torch.randn(3, 64), q4.data[0], q4.scale[0], q4.zero[0][:1], 32)
    with pytest.raises(TypeError, match="int8 data must be int8"):
        op(torch.randn(3, 40), q8.data[0].to(torch.uint8), q8.scale[0], None, 40)
    with pytest.raises(ValueError, match="int8 needs data"):
        op(torch.randn(3, 40), q8.data[0], q8.scale[0], None, 20)
