"""grouped_mm as a torch.library op (reference backend), with fake kernel and autograd.

Wrapping the reference in a custom op hides its data-dependent Python loop from
torch.compile, so a compiled model keeps one graph around it.
"""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import registry

__all__ = ["register_autograd", "grouped_mm"]


@torch.library.custom_op("moe_ref::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return reference.grouped_mm(x, w, counts)


@_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moe_ref::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return reference.grouped_mm_wgrad(x, dy, counts)


@_grouped_mm_wgrad.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(counts.shape[0], x.shape[1], dy.shape[1])


def register_autograd(op: torch.library.CustomOpDef, wgrad_op: torch.library.CustomOpDef) -> None:
    """The backward of a grouped_mm op: dX = op(dY, w^T) (a view), dW = wgrad_op(x, dY); and of
    wgrad_op (gradients of gradients through dW): d x = op(dY, ddW^T), d dY = op(x, ddW)."""

    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):  # type: ignore[no-untyped-def]
        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()  # grads can arrive expanded (stride 0), which torch._grouped_mm rejects
        dx = op(dy, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
        dw = wgrad_op(x, dy, counts) if ctx.needs_input_grad[1] else None
        return dx, dw, None

    op.register_autograd(backward, setup_context=setup_context)

    def wgrad_backward(ctx, ddw):  # type: ignore[no-untyped-def]
        x, dy, counts = ctx.saved_tensors
        dx = op(dy.contiguous(), ddw.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
        ddy = op(x, ddw, counts) if ctx.needs_input_grad[1] else None
        return dx, ddy, None

    wgrad_op.register_autograd(wgrad_backward, setup_context=setup_context)


register_autograd(_grouped_mm, _grouped_mm_wgrad)

registry.register("grouped_mm", "reference", _grouped_mm)


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e]; rows past counts.sum() give zeros.

    Args:
        x_MK: [M, K] rows sorted by expert.
        w_EKN: [E, K, N].
        counts_E: [E] int64 rows per expert.
        backend: see moe.ops.registry.
    """
    return registry.resolve("grouped_mm", backend, x_MK.device)(x_MK, w_EKN, counts_E)
