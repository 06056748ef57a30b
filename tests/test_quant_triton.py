"""The Triton dequantize-GEMM (kernels/quant_gemm.py, quantized_matmul(path="fused-triton")) against
the fp64 oracle x @ dequantize(w): forward and the input gradient in Triton's CPU interpreter, bad
input; compiled on CUDA (skipped without a GPU). The interpreter costs ~10 ms a program: tiny shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moe.ops import triton as ops_triton  # noqa: E402
from moe.quant import quantize, quantized_matmul  # noqa: E402

# (M, K, N): M = 0 and 1, K not a multiple of the 32-row tile (int8), N not a multiple of the tile
SHAPES = [(0, 64, 40), (1, 64, 40), (3, 45, 70), (5, 96, 100), (17, 128, 64)]


def _kernel():  # type: ignore[no-untyped-def]
    ops_triton.kernel_ops()  # moe.kernels importable (installed or source tree)
    from moe.kernels import quant_gemm

    return quant_gemm


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("scheme", "group"), [("int8", 64), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grad_match_oracle(m: int, k: int, n: int, scheme: str, group: int, dtype: torch.dtype) -> None:
    if scheme == "int4" and k % group:
        pytest.skip("group does not divide K")
    torch.manual_seed(m + k + n)
    qw = quantize(torch.randn(1, k, n), scheme, group)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    y = quantized_matmul(x, qw, path="fused-triton")
    w64 = qw.dequantize(torch.float64)[0]
    oracle = x.detach().double() @ w64
    assert y.dtype == dtype and y.shape == (m, n)
    scale = float(oracle.abs().max()) if oracle.numel() else 1.0
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(y.double(), oracle, rtol=tol, atol=tol * max(scale, 1.0))
    g = torch.randn(m, n, dtype=dtype)
    (y * g).sum().backward()
    assert x.grad is not None
    want = g.double() @ w64.t()
    gscale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(x.grad.double(), want, rtol=2 * tol, atol=2 * tol * max(gscale, 1.0))


def test_bad_input() -> None:
    kernel = _kernel()
    q4 = quantize(torch.randn(1, 64, 20), "int4", 32)
    assert q4.zero is not None
    with pytest.raises(ValueError, match="is not one int4 weight of K = 64"):
        kernel.quant_matmul(torch.randn(2, 64), q4.data[0], q4.scale[0][:1], q4.zero[0][:1], 32)
    with pytest.raises(ValueError, match="int4 weight"):
        kernel.quant_matmul(torch.randn(2, 64), q4.data[0], q4.scale[0], q4.zero[0], 48)
    q8 = quantize(torch.randn(1, 40, 20), "int8")
    with pytest.raises(ValueError, match="int8 weight of K = 40"):
        kernel.quant_matmul(torch.randn(2, 40), q8.data[0].to(torch.uint8), q8.scale[0], None, 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_oracle(scheme: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    qw = quantize(torch.randn(1, 512, 384), scheme, 64).to("cuda")
    for m in (1, 7, 100):
        x = torch.randn(m, 512, dtype=dtype, device="cuda")
        oracle = (x.double() @ qw.dequantize(torch.float64)[0]).to(dtype)
        y = quantized_matmul(x, qw, path="fused-triton")
        tol = 2e-2 if dtype == torch.bfloat16 or torch.backends.cuda.matmul.allow_tf32 else 1e-4
        torch.testing.assert_close(y.float(), oracle.float(), rtol=tol, atol=tol * float(oracle.abs().max()))
