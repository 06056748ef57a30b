"""moe.quant: int8 / int4 weight-only quantized experts against their float originals (reference only)."""

from __future__ import annotations

import pytest
import torch

from moe import quant
from moe.experts import Experts, expert_mlp

E, D, H = 3, 64, 96  # D and H divisible by 32; H = 96 is not divisible by 64 or 128


def _weights(K: int = D, N: int = 2 * H, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(E, K, N) / K**0.5
    w[0, :, 0] = 0  # an all-zero column
    w[1, :, 1] = w[1, :, 1].abs() + 0.5  # a one-signed column (its range still contains 0)
    w[2, :32, 2] = -3.0  # a constant group
    return w.to(dtype)


def _per_element_scale(qw: quant.QuantizedWeight) -> torch.Tensor:
    """[E, K, N]: each element's scale."""
    E_, K, N = qw.shape
    return qw.scale.float().repeat_interleave(K // qw.scale.shape[1], dim=1)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group", [("int8", 64), ("int4", 32), ("int4", 64)])
def test_round_trip_error_is_at_most_half_a_scale(
    scheme: str, group: int, dtype: torch.dtype, scale_dtype: torch.dtype
) -> None:
    w = _weights(dtype=dtype)
    qw = quant.quantize(w, scheme, group, scale_dtype)
    back = qw.dequantize(torch.float32)
    assert qw.dequantize().dtype == dtype and back.shape == w.shape
    err = (back - w.float()).abs()
    bound = _per_element_scale(qw) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), float((err - bound).max())
    assert float(err[0, :, 0].max()) == 0.0  # zeros stay exactly zero
    if scheme == "int4":
        assert qw.zero is not None and bool((qw.zero.float() >= 0).all() and (qw.zero.float() <= 15).all())
        assert qw.scale.shape == (E, D // group, 2 * H) and qw.data.shape == (E, D // 2, 2 * H)
    else:
        assert qw.data.dtype == torch.int8 and int(qw.data.abs().max()) <= 127 and qw.scale.shape == (E, 1, 2 * H)


def test_int4_uses_all_16_levels_and_int8_reaches_127() -> None:
    w = _weights()
    q4 = quant.unpack_int4(quant.quantize(w, "int4", 32).data)
    assert int(q4.min()) == 0 and int(q4.max()) == 15
    q8 = quant.quantize(w, "int8").data
    assert int(q8.abs().max()) == 127


def test_int4_is_coarser_than_int8() -> None:
    w = _weights()
    err8 = (quant.quantize(w, "int8").dequantize() - w).abs().mean()
    err4 = (quant.quantize(w, "int4", 64).dequantize() - w).abs().mean()
    assert err8 < err4 / 4


def test_pack_unpack_is_exact_and_the_nibble_layout_is_fixed() -> None:
    q = torch.randint(0, 16, (E, 10, 7), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (E, 5, 7) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), q)
    assert torch.equal(packed, q[:, 0::2] + 16 * q[:, 1::2])  # even rows low nibble, odd rows high
    every = torch.arange(16, dtype=torch.uint8)
    pairs = torch.stack(torch.meshgrid(every, every, indexing="ij"), dim=0).reshape(1, 2, 256)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(pairs)), pairs)
    assert torch.equal(
        quant.pack_int4(pairs).flatten(), torch.arange(256, dtype=torch.uint8).reshape(16, 16).T.flatten()
    )


def test_byte_sizes() -> None:
    w_in, w_out = _weights(D, 2 * H), _weights(H, D)
    q8_in, q8_out = quant.quantize(w_in, "int8"), quant.quantize(w_out, "int8")
    q4_in, q4_out = quant.quantize(w_in, "int4", 32), quant.quantize(w_out, "int4", 32)
    assert q8_in.nbytes == E * (D * 2 * H + 2 * 2 * H)
    assert q4_in.nbytes == E * (D * 2 * H // 2 + 2 * 2 * (D // 32) * 2 * H)
    assert q8_in.nbytes + q8_out.nbytes == E * quant.quantized_expert_bytes(D, H, "int8")
    assert q4_in.nbytes + q4_out.nbytes == E * quant.quantized_expert_bytes(D, H, "int4", 32)
    assert quant.quantized_expert_bytes(D, H, None) == (w_in[0].numel() + w_out[0].numel()) * 2
    assert quant.quantized_expert_bytes(D, H, None, weight_bytes=4) == (w_in[0].numel() + w_out[0].numel()) * 4
    # int4, G = 64, fp16 scale + zero: 4.5 bits a weight.
    assert quant.quantized_expert_bytes(2048, 768, "int4", 64) * 8 == 3 * 2048 * 768 * 45 // 10
    assert quant.quantized_expert_bytes(8, 4, "int8", activation="gelu") == 8 * 4 + 2 * 4 + 4 * 8 + 2 * 8


def _routed(T: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.tensor([15, 0, 20])  # an empty expert; 5 padding rows past counts.sum()
    x = torch.randn(T, D)
    return x, counts


@pytest.mark.parametrize("scheme,group,rel_tol", [("int8", 64, 0.02), ("int4", 32, 0.15)])
def test_quantized_grouped_mm_is_within_the_quantization_error(scheme: str, group: int, rel_tol: float) -> None:
    w = _weights()
    x, counts = _routed()
    qw = quant.quantize(w, scheme, group)
    y_q = quant.quantized_grouped_mm(x, qw, counts, "reference")
    y = quant.ops.grouped_mm(x, w, counts, "reference")
    torch.testing.assert_close(y_q, quant.ops.grouped_mm(x, qw.dequantize(), counts, "reference"))
    # |x (w - w_q)| <= |x| (scale / 2) row by row, with each row's expert.
    expert = torch.repeat_interleave(torch.arange(E), counts)
    n = int(counts.sum())
    bound = torch.einsum("nk,nkj->nj", x[:n].abs(), _per_element_scale(qw)[expert] / 2)
    assert bool(((y_q[:n] - y[:n]).abs() <= bound * (1 + 1e-4) + 1e-5).all())
    assert float(y_q[n:].abs().max()) == 0.0
    assert float((y_q[:n] - y[:n]).norm() / y[:n].norm()) < rel_tol


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("scheme,group,rel_tol", [("int8", 32, 0.03), ("int4", 32, 0.2)])
def test_quantized_expert_mlp_is_close_to_the_float_one(
    scheme: str, group: int, rel_tol: float, activation: str
) -> None:
    experts = Experts(E, D, H, activation, backend="reference")
    x, counts = _routed()
    qe = quant.QuantizedExperts.from_experts(experts, scheme, group)
    with torch.no_grad():
        y, y_q = experts(x, counts), qe(x, counts)
    n = int(counts.sum())
    rel = float((y_q[:n] - y[:n]).norm() / y[:n].norm())
    assert rel < rel_tol, rel
    assert float(y_q[n:].abs().max()) == 0.0
    # Exactly the float MLP on the dequantized weights.
    expected = expert_mlp(x, qe.qw_in.dequantize(), qe.qw_out.dequantize(), counts, activation, "reference")
    torch.testing.assert_close(y_q, expected)
    assert qe.nbytes == E * quant.quantized_expert_bytes(D, H, scheme, group, activation)


def test_int8_error_is_smaller_than_int4_error_on_the_mlp() -> None:
    experts = Experts(E, D, H, backend="reference")
    x, counts = _routed()
    with torch.no_grad():
        y = experts(x, counts)
        errs = [(quant.QuantizedExperts.from_experts(experts, s, 32)(x, counts) - y).norm() for s in ("int8", "int4")]
    assert errs[0] < errs[1] / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gradients_flow_to_the_activations(scheme: str, dtype: torch.dtype) -> None:
    experts = Experts(E, D, H, backend="reference")
    qe = quant.QuantizedExperts.from_experts(experts, scheme, 32)
    x, counts = _routed()
    x = x.to(dtype).requires_grad_()
    y = qe(x, counts)
    assert y.dtype == dtype
    grad_out = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, grad_out)
    # The same gradient as the float MLP whose weights are the dequantized ones.
    x2 = x.detach().requires_grad_()
    ref = expert_mlp(x2, qe.qw_in.dequantize(dtype), qe.qw_out.dequantize(dtype), counts, "swiglu", "reference")
    (g_ref,) = torch.autograd.grad(ref, x2, grad_out)
    torch.testing.assert_close(g, g_ref)
    n = int(counts.sum())
    assert float(g[n:].abs().max()) == 0.0 and float(g[:n].abs().max()) > 0


def test_gradients_match_finite_differences_in_fp64() -> None:
    w_in, w_out = _weights(D, 2 * H, torch.float64), _weights(H, D, torch.float64)
    qi, qo = quant.quantize(w_in, "int4", 32), quant.quantize(w_out, "int8")
    counts = torch.tensor([2, 1, 2])
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: quant.quantized_expert_mlp(x_, qi, qo, counts, backend="reference"), x)


def test_bad_input_raises_clear_errors() -> None:
    w = _weights()
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quant.quantize(w, "int3")
    with pytest.raises(ValueError, match="does not divide the inner dimension K=96"):
        quant.quantize(_weights(H, D), "int4", 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.quantize(w, "int4", 16)
    with pytest.raises(ValueError, match="floating point"):
        quant.quantize(w.to(torch.int32), "int8")
    with pytest.raises(ValueError, match=r"\[E, K, N\]"):
        quant.quantize(w[0], "int8")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(torch.full((1, 32, 2), float("nan")), "int4", 32)
    with pytest.raises(ValueError, match="scale_dtype"):
        quant.quantize(w, "int8", scale_dtype=torch.int8)
    with pytest.raises(ValueError, match="too large for scale_dtype"):
        quant.quantize(torch.full((1, 32, 2), 1e9), "int8", scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="must be even"):
        quant.pack_int4(torch.zeros(1, 3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        quant.pack_int4(torch.zeros(1, 4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        quant.pack_int4(torch.full((1, 2, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="packed uint8"):
        quant.unpack_int4(torch.zeros(1, 2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quant.dequantize(w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quant.quantized_expert_bytes(D, H, "fp8")
    with pytest.raises(ValueError, match="does not divide the inner dimension 96"):
        quant.quantized_expert_bytes(D, H, "int4", 64)
    with pytest.raises(TypeError, match="w_in and w_out"):
        quant.QuantizedExperts.from_experts(torch.nn.Linear(2, 2), "int8")  # type: ignore[arg-type]
