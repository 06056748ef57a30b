"""Weight-only quantized expert weights: int8 per output channel and int4 group-wise, with a
pure-PyTorch reference (quantize, dequantize, grouped GEMM and expert MLP on dequantized weights).

This is the reference and the test oracle of issue 19. moe.offload uses it for quantized experts
(OffloadConfig.expert_quant); quantized_matmul multiplies one expert's weight with the C++
fused dequantize-GEMM on CPU (csrc/quant_matmul_cpu.cpp) and by dequantize-then-matmul elsewhere.

Weights use the experts' `x @ w` layout, one [K, N] matrix per expert, K the inner (input)
dimension and N the output width: w_in [E, D, F] (K = D, N = F) and w_out [E, H, D] (K = H, N = D)
of moe.experts.Experts. Every scale is rounded *up* when it is stored in `scale_dtype`, so no
weight ever saturates and each dequantized element is within scale / 2 of the original:

    int8  symmetric, one scale per output channel (column n of each expert):
              scale[e, 0, n] = max_k |w[e, k, n]| / 127,   q = clamp(round(w / scale), -127, 127)
              w ~= q * scale
          data int8 [E, K, N], scale [E, 1, N].
    int4  asymmetric, one scale and one zero point per group of G consecutive k (G in 32..128,
          G divides K) and output channel; the range of a group always contains 0, so the zero
          point lies in [0, 15]:
              lo = min(min_k w, 0), hi = max(max_k w, 0),  scale = (hi - lo) / 15,  zero = -lo / scale
              q = clamp(round(w / scale + zero), 0, 15),   w ~= (q - zero) * scale
          data uint8 [E, K / 2, N] (two 4-bit values per byte along K: row 2i in the low nibble,
          row 2i + 1 in the high nibble), scale and zero [E, K / G, N] (zero is a float zero point,
          stored like the scale, as HQQ does).

Bytes of one expert (scale_dtype fp16): int8 = K N + 2 N per matrix; int4 with G = 64 is
4.5 bits a weight (K N / 2 + 2 * 2 * (K / G) N); see quantized_expert_bytes.

Shape legend: E experts, K inner dimension, N output width, G group size, D model dim,
H expert hidden, F first-GEMM width (2H for SwiGLU), N rows sorted by expert (x_ND, as in
moe.experts).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from moe import ops
from moe.experts import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, ExpertsBase, activate, expert_mlp

__all__ = [
    "SCHEMES",
    "INT4_GROUP_SIZES",
    "QuantizedWeight",
    "QuantizedExperts",
    "quantize",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "quantized_grouped_mm",
    "quantized_expert_mlp",
    "quantized_expert_bytes",
    "quantized_matmul",
    "quantized_mlp_one",
    "matmul_path",
    "MATMUL_PATHS",
]

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized expert weight tensor [E, K, N] (see the module docstring for the formulas).

    Attributes:
        scheme: "int8" or "int4".
        data: int8 [E, K, N] (int8) or uint8 [E, K / 2, N] (int4, two values a byte along K).
        scale: [E, 1, N] (int8) or [E, K / G, N] (int4), in scale_dtype.
        zero: None (int8) or [E, K / G, N] float zero points in [0, 15] (int4), in scale_dtype.
        group_size: G (int4); K for int8 (one group per column).
        shape: (E, K, N) of the original weight.
        dtype: the original weight's dtype (dequantize's default).
    """

    scheme: str
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    shape: tuple[int, int, int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of data + scale (+ zero): what this weight occupies in memory and on a link."""
        tensors = [self.data, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same quantized weight with its tensors on `device`."""
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(
            self.scheme, self.data.to(device), self.scale.to(device), zero, self.group_size, self.shape, self.dtype
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[E, K, N] in `dtype` (default: the original weight's dtype); see dequantize()."""
        return dequantize(self, dtype)


def _check_weight(w_EKN: torch.Tensor) -> None:
    if not isinstance(w_EKN, torch.Tensor):
        raise TypeError(f"expected a tensor of expert weights [E, K, N], got {type(w_EKN).__name__}")
    if w_EKN.dim() != 3:
        raise ValueError(f"expert weights must be [E, K, N] (3 dims), got shape {tuple(w_EKN.shape)}")
    if w_EKN.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"expert weights must be floating point (fp32/fp16/bf16/fp64), got {w_EKN.dtype}")
    if not bool(torch.isfinite(w_EKN).all()):
        raise ValueError("expert weights contain NaN or Inf; they cannot be quantized")


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """scale in scale_dtype, rounded up (never below the exact scale, never 0)."""
    info = torch.finfo(scale_dtype)
    stored = (scale * (1 + info.eps)).clamp(min=info.tiny).to(scale_dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"weights too large for scale_dtype={scale_dtype} (a scale overflows)")
    return stored


def quantize(
    w_EKN: torch.Tensor,
    scheme: str,
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantizes expert weights [E, K, N] (inner dimension K) with `scheme`.

    Args:
        w_EKN: floating-point weights, finite; e.g. Experts.w_in [E, D, F] or w_out [E, H, D].
        scheme: "int8" (symmetric, per output channel) or "int4" (group-wise with zero points).
        group_size: int4 only: G in INT4_GROUP_SIZES (32, 64, 128), dividing K.
        scale_dtype: dtype of the stored scales (and int4 zero points): fp16 (default), bf16 or fp32.

    Returns:
        A QuantizedWeight; every element of its dequantization is within scale / 2 of w_EKN.

    Raises:
        ValueError: unknown scheme, weights not [E, K, N] / not floating point / not finite, a group
            size not in INT4_GROUP_SIZES or not dividing K, an odd K for int4, a bad scale_dtype.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
    _check_weight(w_EKN)
    E, K, N = w_EKN.shape
    w = w_EKN.detach().float()
    if scheme == "int8":
        scale = _store_scale(w.abs().amax(dim=1, keepdim=True) / 127, scale_dtype)  # [E, 1, N]
        q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", q, scale, None, K, (E, K, N), w_EKN.dtype)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if K % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the inner dimension K={K} of {(E, K, N)}")
    groups = w.reshape(E, K // group_size, group_size, N)
    lo = groups.amin(dim=2).clamp(max=0)  # [E, K / G, N]: the range always contains 0
    hi = groups.amax(dim=2).clamp(min=0)
    scale = _store_scale((hi - lo) / 15, scale_dtype)
    zero = (-lo / scale.float()).clamp(0, 15).to(scale_dtype)
    q = torch.round(groups / scale.float()[:, :, None] + zero.float()[:, :, None]).clamp(0, 15)
    packed = pack_int4(q.to(torch.uint8).reshape(E, K, N))
    return QuantizedWeight("int4", packed, scale, zero, group_size, (E, K, N), w_EKN.dtype)


def pack_int4(q_EKN: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [..., K, N] with K even -> uint8 [..., K / 2, N]: row 2i in the low
    nibble, row 2i + 1 in the high nibble. Raises ValueError for another dtype, an odd K or values > 15."""
    if q_EKN.dtype != torch.uint8:
        raise ValueError(f"pack_int4 takes uint8 values in [0, 15], got {q_EKN.dtype}")
    if q_EKN.dim() < 2 or q_EKN.shape[-2] % 2:
        raise ValueError(
            f"pack_int4 packs pairs of rows along K = dim -2, which must be even; got {tuple(q_EKN.shape)}"
        )
    if q_EKN.numel() and int(q_EKN.max()) > 15:
        raise ValueError(f"pack_int4 takes 4-bit values in [0, 15], got a maximum of {int(q_EKN.max())}")
    return q_EKN[..., 0::2, :] | (q_EKN[..., 1::2, :] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2, N] (pack_int4's layout) -> uint8 [..., K, N] with values in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes packed uint8 data, got {packed.dtype}")
    if packed.dim() < 2:
        raise ValueError(f"unpack_int4 takes [..., K / 2, N], got shape {tuple(packed.shape)}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-2).reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """QuantizedWeight -> [E, K, N] in `dtype` (default qw.dtype), computed in fp32:
    int8: q * scale; int4: (q - zero) * scale per group. Not differentiable w.r.t. the weights
    (the result is a plain tensor; gradients flow to the activations that multiply it)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"dequantize takes a QuantizedWeight, got {type(qw).__name__}")
    E, K, N = qw.shape
    dtype = qw.dtype if dtype is None else dtype
    if qw.scheme == "int8":
        if qw.data.dtype != torch.int8 or tuple(qw.data.shape) != (E, K, N):
            raise ValueError(f"int8 data must be int8 {(E, K, N)}, got {qw.data.dtype} {tuple(qw.data.shape)}")
        return (qw.data.float() * qw.scale.float()).to(dtype)
    if qw.scheme != "int4":
        raise ValueError(f"unknown quantization scheme {qw.scheme!r}; choose one of {SCHEMES}")
    G = qw.group_size
    if tuple(qw.data.shape) != (E, K // 2, N):
        raise ValueError(f"int4 data must be uint8 {(E, K // 2, N)} (packed), got {tuple(qw.data.shape)}")
    if qw.zero is None or tuple(qw.scale.shape) != (E, K // G, N) or tuple(qw.zero.shape) != (E, K // G, N):
        raise ValueError(f"int4 scale and zero must be {(E, K // G, N)} for group size {G}")
    q = unpack_int4(qw.data).float().reshape(E, K // G, G, N)
    w = (q - qw.zero.float()[:, :, None]) * qw.scale.float()[:, :, None]
    return w.reshape(E, K, N).to(dtype)


def quantized_grouped_mm(
    x_NK: torch.Tensor, qw: QuantizedWeight, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Grouped GEMM on dequantized weights: rows of expert e times dequantize(qw)[e], in x's dtype.

    Args:
        x_NK: [N, K] rows sorted by expert; counts_E: [E] int64 rows per expert.
        qw: quantized [E, K, N_out]; backend: the grouped GEMM's backend (moe.ops).

    Returns:
        [N, N_out]; rows past counts.sum() are 0. Differentiable w.r.t. x_NK.
    """
    return ops.grouped_mm(x_NK, dequantize(qw, x_NK.dtype), counts_E, backend)


def quantized_expert_mlp(
    x_ND: torch.Tensor,
    qw_in: QuantizedWeight,
    qw_out: QuantizedWeight,
    counts_E: torch.Tensor,
    activation: str = "swiglu",
    backend: str = "auto",
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
) -> torch.Tensor:
    """moe.experts.expert_mlp on dequantized weights (the reference for fused kernels).

    Args:
        x_ND: [N, D] rows sorted by expert; counts_E: [E] int64.
        qw_in: quantized w_in [E, D, F]; qw_out: quantized w_out [E, H, D].
        activation, backend, b_in, b_out, alpha, limit: as expert_mlp (biases stay unquantized).

    Returns:
        [N, D] in x's dtype; differentiable w.r.t. x_ND (and the biases).
    """
    w_in, w_out = dequantize(qw_in, x_ND.dtype), dequantize(qw_out, x_ND.dtype)
    return expert_mlp(x_ND, w_in, w_out, counts_E, activation, backend, b_in, b_out, alpha, limit)


FUSED_CPU_PATH = "fused-cpu"
FUSED_TRITON_PATH = "fused-triton"
FALLBACK_PATH = "dequantize-then-matmul"
MATMUL_PATHS = ("auto", FUSED_CPU_PATH, FUSED_TRITON_PATH, FALLBACK_PATH)


def matmul_path(device: torch.device | str) -> str:
    """How quantized_matmul multiplies on `device` by default: "fused-cpu" (the C++ op
    moe::quant_matmul, dequantization inside the GEMM) on a CPU where the extension is built,
    else "dequantize-then-matmul" (the weight dequantized whole, then a float matmul; also the
    reference). The Triton dequantize-GEMM (kernels/quant_gemm.py, path="fused-triton") is not a
    default anywhere yet: it has run only in Triton's CPU interpreter, never compiled on a GPU."""
    from moe.ops import cpp

    device = torch.device(device)
    return FUSED_CPU_PATH if device.type == "cpu" and cpp.has_quant_matmul(device) else FALLBACK_PATH


def quantized_matmul(x_NK: torch.Tensor, qw: QuantizedWeight, path: str = "auto") -> torch.Tensor:
    """x_NK [N, K] @ one expert's quantized weight qw [1, K, N_out] -> [N, N_out] in x's dtype.

    Args:
        path: "auto" (matmul_path(x.device)), "fused-cpu", "fused-triton" (CUDA, or Triton's
            interpreter on CPU) or "dequantize-then-matmul" (the reference: x_NK @ dequantize(qw, x.dtype)[0]).

    Differentiable w.r.t. x_NK on both paths.
    """
    if path not in MATMUL_PATHS:
        raise ValueError(f"path must be one of {MATMUL_PATHS}, got {path!r}")
    if qw.shape[0] != 1:
        raise ValueError(f"quantized_matmul takes one expert's weight [1, K, N], got {qw.shape}")
    if x_NK.dim() != 2 or x_NK.shape[1] != qw.shape[1]:
        raise ValueError(f"quantized_matmul: x must be [N, K={qw.shape[1]}], got {tuple(x_NK.shape)}")
    chosen = matmul_path(x_NK.device) if path == "auto" else path
    if chosen == FUSED_CPU_PATH:
        if matmul_path(x_NK.device) != FUSED_CPU_PATH:
            raise ValueError(f"path='fused-cpu' needs x on the CPU and the C++ extension built, got {x_NK.device}")
        from moe.ops import cpp

        zero = None if qw.zero is None else qw.zero[0]
        return cpp.quant_matmul(x_NK, qw.data[0], qw.scale[0], zero, qw.group_size)
    if chosen == FUSED_TRITON_PATH:
        return _TritonQuantMatmul.apply(x_NK, qw)
    return x_NK @ dequantize(qw, x_NK.dtype)[0]


class _TritonQuantMatmul(torch.autograd.Function):
    """The Triton dequantize-GEMM forward; backward dx = dy @ dequantize(w)^T (the weights are constant)."""

    @staticmethod
    def forward(ctx: Any, x_NK: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        from moe.ops import triton as ops_triton

        if not ops_triton.triton_installed():
            raise ValueError("path='fused-triton' needs Triton installed")
        kernel = importlib.import_module("moe.kernels.quant_gemm")
        ctx.qw = qw
        zero = None if qw.zero is None else qw.zero[0]
        return kernel.quant_matmul(x_NK, qw.data[0], qw.scale[0], zero, qw.group_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ dequantize(ctx.qw, grad.dtype)[0].t(), None


def quantized_mlp_one(
    x_ND: torch.Tensor, qw_in: QuantizedWeight, qw_out: QuantizedWeight, activation: str = "swiglu"
) -> torch.Tensor:
    """One expert's MLP act(x w_in) w_out on quantized w_in [1, D, F] and w_out [1, H, D], each
    multiplied by quantized_matmul; equals expert_mlp on the dequantized weights. [N, D] -> [N, D]."""
    return quantized_matmul(activate(quantized_matmul(x_ND, qw_in), activation), qw_out)


class QuantizedExperts(ExpertsBase):
    """Routed experts holding quantized w_in / w_out (buffers, not parameters: inference only),
    computed by dequantizing both whole tensors and running the float expert MLP.

    Build one with QuantizedExperts.from_experts(experts, scheme, group_size). No fused path.
    """

    def __init__(
        self,
        qw_in: QuantizedWeight,
        qw_out: QuantizedWeight,
        activation: str = "swiglu",
        backend: str = "auto",
        b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None,
        alpha: float = SWIGLU_OAI_ALPHA,
        limit: float = SWIGLU_OAI_LIMIT,
    ) -> None:
        super().__init__()
        self.qw_in, self.qw_out = qw_in, qw_out
        self.activation, self.backend = activation, backend
        self.alpha, self.limit = float(alpha), float(limit)
        self.num_experts, self.dim, _ = qw_in.shape
        self.hidden_dim = qw_out.shape[1]
        self.b_in = None if b_in is None else b_in.detach().clone()
        self.b_out = None if b_out is None else b_out.detach().clone()

    @classmethod
    def from_experts(
        cls, experts: ExpertsBase, scheme: str, group_size: int = 64, scale_dtype: torch.dtype = torch.float16
    ) -> QuantizedExperts:
        """Quantizes a moe.experts.Experts' w_in and w_out (biases are kept as they are)."""
        w_in, w_out = getattr(experts, "w_in", None), getattr(experts, "w_out", None)
        if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor):
            raise TypeError(f"from_experts needs experts with w_in and w_out tensors, got {type(experts).__name__}")
        return cls(
            quantize(w_in, scheme, group_size, scale_dtype),
            quantize(w_out, scheme, group_size, scale_dtype),
            getattr(experts, "activation", "swiglu"),
            getattr(experts, "backend", "auto"),
            getattr(experts, "b_in", None),
            getattr(experts, "b_out", None),
            getattr(experts, "alpha", SWIGLU_OAI_ALPHA),
            getattr(experts, "limit", SWIGLU_OAI_LIMIT),
        )

    @property
    def w_in(self) -> torch.Tensor:
        """A zero-stride stand-in [E, D, F] with the original weight's dtype and the data's device
        (moe.MoE checks its input against experts.w_in); the weights are qw_in."""
        return torch.zeros((), dtype=self.qw_in.dtype, device=self.qw_in.data.device).expand(self.qw_in.shape)

    @property
    def w_out(self) -> torch.Tensor:
        """A zero-stride stand-in [E, H, D], as w_in; the weights are qw_out."""
        return torch.zeros((), dtype=self.qw_out.dtype, device=self.qw_out.data.device).expand(self.qw_out.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weights (biases not counted)."""
        return self.qw_in.nbytes + self.qw_out.nbytes

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND [N, D] sorted by expert, counts_E [E] -> [N, D]; rows past counts.sum() give 0."""
        qw_in, qw_out = self.qw_in.to(x_ND.device), self.qw_out.to(x_ND.device)
        b_in = None if self.b_in is None else self.b_in.to(x_ND.device)
        b_out = None if self.b_out is None else self.b_out.to(x_ND.device)
        return quantized_expert_mlp(
            x_ND, qw_in, qw_out, counts_E, self.activation, self.backend, b_in, b_out, self.alpha, self.limit
        )


def quantized_expert_bytes(
    dim: int,
    hidden: int,
    scheme: str | None,
    group_size: int = 64,
    activation: str = "swiglu",
    scale_bytes: int = 2,
    weight_bytes: int = 2,
) -> int:
    """Bytes of one expert's w_in [D, F] + w_out [H, D] (F = 2H for SwiGLU, H for GELU), as
    quantize() stores them with a `scale_bytes`-byte scale_dtype (2: fp16/bf16).

    scheme None: unquantized, `weight_bytes` a weight (2: bf16). "int8": K N + scale_bytes N per
    matrix. "int4": K N / 2 + 2 scale_bytes (K / G) N per matrix (scale and zero point per group).
    Raises ValueError as quantize() would (unknown scheme, group size, G not dividing D or H).
    """
    if dim < 1 or hidden < 1:
        raise ValueError(f"dim and hidden must be positive, got {dim}, {hidden}")
    width = 2 * hidden if activation in ("swiglu", "swiglu_oai") else hidden
    mats = ((dim, width), (hidden, dim))  # (K, N) of w_in and w_out
    if scheme is None:
        return sum(k * n for k, n in mats) * weight_bytes
    if scheme == "int8":
        return sum(k * n + scale_bytes * n for k, n in mats)
    if scheme != "int4":
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES} or None")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    for k, _ in mats:
        if k % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide the inner dimension {k}")
    return sum(k * n // 2 + 2 * scale_bytes * (k // group_size) * n for k, n in mats)
