"""Backend "cpp": the C++ ops of the moe._C extension (csrc/), as torch.library ops moe::*.

Shape legend: T tokens, D features, E experts, N dispatched copies (rows sorted by expert),
M grouped-GEMM rows, K/N GEMM inner/outer dims, F = 2H a fused [gate | up] projection.

The schemas and kernels live in C++ (csrc/schemas.cpp); this module adds what torch needs on the
Python side: fake kernels (torch.compile, meta tensors) and autograd formulas, each written with
the moe:: ops themselves (under create_graph=True the two fused backward kernels, which have no
autograd of their own, give way to differentiable formulas), so gradients of gradients work too.
Backward passes avoid copies: the dX of grouped_mm reads the transposed weight view in place
(BLAS transposes on the fly).

The extension is loaded the first time the backend is asked whether it can run, never at
`import moe`. If it is not built, the backend reports itself unavailable, so backend="auto"
falls back to the references, and a warning says once how to build it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from moe import reference
from moe.ops import registry

__all__ = [
    "NAME",
    "BUILD_COMMAND",
    "loaded",
    "sort_by_expert",
    "permute",
    "unpermute",
    "grouped_mm",
    "swiglu",
    "swiglu_grouped_mm",
    "fused_swiglu_grouped_mm",
    "swiglu_experts",
    "fused_swiglu_experts",
    "quant_matmul",
    "has_quant_matmul",
]


NAME = "cpp"
BUILD_COMMAND = "pip install --no-build-isolation --no-deps -e .  (in the repository root; or `make venv`)"

# The C++ ops each registry op calls, forward and backward (all must have a kernel on the device).
_NEEDS = {
    "sort_by_expert": ("sort_by_expert",),
    "permute": ("permute", "scatter_rows"),
    "unpermute": ("unpermute", "unpermute_backward"),
    "grouped_mm": ("grouped_mm", "grouped_mm_wgrad"),
    "swiglu": ("swiglu", "swiglu_backward"),
    # not a registry op: moe.ops.activation.swiglu_grouped_mm takes it where swiglu and grouped_mm are cpp's
    "swiglu_grouped_mm": ("swiglu_grouped_mm", "swiglu_grouped_mm_backward"),
    "swiglu_experts": ("swiglu_experts", "swiglu_experts_backward"),  # not a registry op either
    "quant_matmul": ("quant_matmul",),  # not a registry op: moe.quant.matmul_path picks it
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _constant_under_compile(fn: Callable[..., bool]) -> Callable[..., bool]:
    """torch.compiler.assume_constant_result without its import of torch._dynamo, which imports
    triton and costs ~1.5 s at `import moe`; the public decorator only sets this attribute.
    test_compiled_cpp_layer_fullgraph breaks (graph break) if a torch release renames it."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@functools.cache
def _load() -> bool:
    """Imports moe._C and registers the Python side once; False (and one warning) if not built."""
    try:
        importlib.import_module("moe._C")
    except ImportError as err:
        warnings.warn(
            f"moe._C, the C++ ops, is not built ({err}); using the pure-PyTorch references. "
            f"Build it with: {BUILD_COMMAND}",
            stacklevel=3,
        )
        return False
    _register_fakes()
    _register_autograd()
    return True


@_constant_under_compile
def loaded() -> bool:
    """Whether the extension is importable (loads it on the first call; a constant under torch.compile)."""
    return _load()


@functools.cache
def _has_kernels(op: str, device_type: str) -> bool:
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", key) for name in _NEEDS[op]
    )


def _available(op: str) -> Callable[[torch.device], bool]:
    @_constant_under_compile
    def check(device: torch.device) -> bool:
        return _load() and _has_kernels(op, device.type)

    return check


# ---------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    fake = torch.library.register_fake

    @fake("moe::sort_by_expert")
    def _(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_ids.new_empty(expert_ids.numel()), expert_ids.new_empty(num_experts)

    @fake("moe::align_block_size")
    def _(counts: torch.Tensor, block_size: int) -> torch.Tensor:
        return counts.new_empty(counts.shape[0] + 1)

    @fake("moe::permute")
    def _(x: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
        return x.new_empty(token_idx.shape[0], x.shape[1])

    @fake("moe::scatter_rows")
    def _(y: torch.Tensor, token_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return y.new_empty(num_tokens, y.shape[1])

    @fake("moe::unpermute")
    def _(y: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return y.new_empty(num_tokens, y.shape[1])

    @fake("moe::unpermute_backward")
    def _(
        grad_out: torch.Tensor, y: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return y.new_empty(y.shape), weights.new_empty(y.shape[0])

    @fake("moe::grouped_mm")
    def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[2])

    @fake("moe::grouped_mm_wgrad")
    def _(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])

    @fake("moe::quant_matmul")
    def _(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: Any, group_size: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], data.shape[1])

    @fake("moe::swiglu")
    def _(h: torch.Tensor) -> torch.Tensor:
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @fake("moe::swiglu_backward")
    def _(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h.new_empty(h.shape)

    @fake("moe::swiglu_grouped_mm")
    def _(h: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return h.new_empty(h.shape[0], w.shape[2])

    @fake("moe::swiglu_grouped_mm_backward")
    def _(
        grad_y: torch.Tensor, h: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, weight_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return h.new_empty(h.shape), w.new_empty(w.shape if weight_grad else (0,))

    @fake("moe::swiglu_experts")
    def _(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.new_empty(x.shape), x.new_empty(x.shape[0], w_in.shape[2])

    @fake("moe::swiglu_experts_backward")
    def _(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        h: torch.Tensor,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        counts: torch.Tensor,
        output_mask: list[bool],
    ) -> tuple[torch.Tensor, ...]:
        return tuple(
            t.new_empty(t.shape if need else (0,)) for t, need in zip((x, w_in, w_out), output_mask, strict=True)
        )


# ---------------------------------------------------------------- autograd
# setup_context / backward signatures follow torch.library.register_autograd.


def _permute_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, token_idx = inputs
    ctx.save_for_backward(token_idx)
    ctx.num_tokens = x.shape[0]


def _permute_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
    (token_idx,) = ctx.saved_tensors
    return torch.ops.moe.scatter_rows(grad, token_idx, ctx.num_tokens), None


def _scatter_rows_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[1])


def _scatter_rows_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
    (token_idx,) = ctx.saved_tensors
    return torch.ops.moe.permute(grad, token_idx), None, None


def _unpermute_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    y, token_idx, weights, _ = inputs
    ctx.save_for_backward(y, token_idx, weights)


def _unpermute_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
    y, token_idx, weights = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: moe::unpermute_backward has no autograd of its own
        grad_y, grad_w = reference.unpermute_backward(grad, y, token_idx, weights)
    else:
        grad_y, grad_w = torch.ops.moe.unpermute_backward(grad, y, token_idx, weights)
    return (
        grad_y if ctx.needs_input_grad[0] else None,
        None,
        grad_w if ctx.needs_input_grad[2] else None,
        None,
    )


def _grouped_mm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, w, counts = ctx.saved_tensors
    # w.transpose is a view: BLAS reads it transposed, no [E, N, K] copy of the weights.
    dx = torch.ops.moe.grouped_mm(dy, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    dw = torch.ops.moe.grouped_mm_wgrad(x, dy, counts) if ctx.needs_input_grad[1] else None
    return dx, dw, None


def _wgrad_backward(ctx: Any, ddw: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, dy, counts = ctx.saved_tensors
    dx = torch.ops.moe.grouped_mm(dy, ddw.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
    ddy = torch.ops.moe.grouped_mm(x, ddw, counts) if ctx.needs_input_grad[1] else None
    return dx, ddy, None


def _swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (h,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: moe::swiglu_backward has no autograd of its own
        return reference.swiglu_backward(h, grad)
    return torch.ops.moe.swiglu_backward(grad, h)


def _swiglu_grouped_mm_backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    h, w, counts = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph=True: the fused backward has no autograd of its own
        dy = dy.contiguous()
        dh = reference.swiglu_backward(h, torch.ops.moe.grouped_mm(dy, w.transpose(1, 2), counts)) if need_h else None
        dw = torch.ops.moe.grouped_mm_wgrad(torch.ops.moe.swiglu(h), dy, counts) if need_w else None
        return dh, dw, None
    dh, dw = torch.ops.moe.swiglu_grouped_mm_backward(dy, h, w, counts, need_w)
    return dh if need_h else None, dw if need_w else None, None


def _swiglu_experts_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, w_in, w_out, counts = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd passes a zero-filled [N, 2H] gradient for h
    ctx.save_for_backward(x, output[1], w_in, w_out, counts)


def _swiglu_experts_backward(ctx: Any, dy: torch.Tensor, _dh: Any) -> tuple[torch.Tensor | None, ...]:
    x, h, w_in, w_out, counts = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:3]]
    if dy is None:  # y took no part in the loss (grads are not materialized)
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the fused backward has no autograd of its own
        ops = torch.ops.moe
        h = ops.grouped_mm(x, w_in, counts)  # recomputed: the saved h is not connected to x and w_in
        dy = dy.contiguous()
        grad_h = reference.swiglu_backward(h, ops.grouped_mm(dy, w_out.transpose(1, 2), counts))
        dx = ops.grouped_mm(grad_h, w_in.transpose(1, 2), counts) if need[0] else None
        dw_in = ops.grouped_mm_wgrad(x, grad_h, counts) if need[1] else None
        dw_out = ops.grouped_mm_wgrad(ops.swiglu(h), dy, counts) if need[2] else None
        return dx, dw_in, dw_out, None
    dx, dw_in, dw_out = torch.ops.moe.swiglu_experts_backward(dy, x, h, w_in, w_out, counts, need)
    return dx if need[0] else None, dw_in if need[1] else None, dw_out if need[2] else None, None


def _quant_matmul_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.weight = inputs[1:]  # (data, scale, zero, group_size): not differentiable (quantized weights)
    ctx.k = inputs[0].shape[1]


def _quant_matmul_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    from moe.quant import QuantizedWeight, dequantize  # moe.quant imports moe.ops: import on use

    data, scale, zero, group_size = ctx.weight
    n = data.shape[1]
    scheme = "int8" if zero is None else "int4"
    qw = QuantizedWeight(
        scheme, data[None], scale[None], None if zero is None else zero[None], group_size, (1, ctx.k, n), grad.dtype
    )
    return grad @ dequantize(qw, grad.dtype)[0].t(), None, None, None, None


def _register_autograd() -> None:
    reg = torch.library.register_autograd
    reg("moe::permute", _permute_backward, setup_context=_permute_setup)
    reg("moe::scatter_rows", _scatter_rows_backward, setup_context=_scatter_rows_setup)
    reg("moe::unpermute", _unpermute_backward, setup_context=_unpermute_setup)
    reg("moe::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup)
    reg("moe::grouped_mm_wgrad", _wgrad_backward, setup_context=_grouped_mm_setup)
    reg("moe::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
    reg("moe::swiglu_grouped_mm", _swiglu_grouped_mm_backward, setup_context=_grouped_mm_setup)
    reg("moe::swiglu_experts", _swiglu_experts_backward, setup_context=_swiglu_experts_setup)
    reg("moe::quant_matmul", _quant_matmul_backward, setup_context=_quant_matmul_setup)


# ---------------------------------------------------------------- registry entry points


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [N], counts [E]) of expert_ids ([N] or [T, K], -1 = dropped): stable, dropped last."""
    return torch.ops.moe.sort_by_expert(expert_ids.reshape(-1), num_experts)


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """x_sorted [N, D] = x_TD[token_idx_N]; backward sums rows back per token (scatter_rows)."""
    return torch.ops.moe.permute(x_TD, token_idx_N)


def unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weights_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_TD [T, D]: per token, the weights_N-weighted sum of its rows of y_ND, in fp32, deterministic."""
    return torch.ops.moe.unpermute(y_ND, token_idx_N, weights_N, num_tokens)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y [M, N]: x rows of expert e times w_EKN[e], one BLAS GEMM per expert; padding rows are 0."""
    return torch.ops.moe.grouped_mm(x_MK, w_EKN, counts_E)


def swiglu(h_NF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h_NF = [gate | up] ([N, 2H] -> [N, H]) in one fused pass."""
    return torch.ops.moe.swiglu(h_NF)


def swiglu_grouped_mm(h_NF: torch.Tensor, w_EHD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm(swiglu(h_NF), w_EHD, counts_E) in one op that keeps no [N, H] activation."""
    return torch.ops.moe.swiglu_grouped_mm(h_NF, w_EHD, counts_E)


fused_swiglu_grouped_mm = _available("swiglu_grouped_mm")  # (device) -> whether swiglu_grouped_mm runs there


def swiglu_experts(
    x_ND: torch.Tensor, w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """swiglu_grouped_mm(grouped_mm(x_ND, w_in_EDF), w_out_EHD): the SwiGLU expert MLP [N, D], with one
    backward for both GEMMs that never holds the whole [N, 2H] gradient of the first one."""
    return torch.ops.moe.swiglu_experts(x_ND, w_in_EDF, w_out_EHD, counts_E)[0]


fused_swiglu_experts = _available("swiglu_experts")  # (device) -> whether swiglu_experts runs there


def quant_matmul(
    x_MK: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """y [M, N] = x_MK @ dequantize(w) with the dequantization inside the GEMM (one expert's
    moe.quant weight: int8 data [K, N] + scale [1, N], or int4 uint8 [K / 2, N] + scale, zero [K / G, N])."""
    return torch.ops.moe.quant_matmul(x_MK, data, scale, zero, group_size)


has_quant_matmul = _available("quant_matmul")


for _op, _fn in (
    ("sort_by_expert", sort_by_expert),
    ("permute", permute),
    ("unpermute", unpermute),
    ("grouped_mm", grouped_mm),
    ("swiglu", swiglu),
):
    registry.register(_op, NAME, _fn, _available(_op))
