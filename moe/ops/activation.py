"""The expert activation as a registry op, so a backend can fuse it (backend "cpp": one pass)."""

from __future__ import annotations

import torch

from moe import reference
from moe.ops import cpp, registry
from moe.ops.grouped_mm import grouped_mm

__all__ = ["swiglu", "swiglu_grouped_mm", "swiglu_experts"]


registry.register("swiglu", "reference", reference.swiglu)


def swiglu(h_NF: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for h_NF = [gate | up] ([N, 2H] -> [N, H]), differentiable in h."""
    return registry.resolve("swiglu", backend, h_NF.device)(h_NF)


def swiglu_grouped_mm(
    h_NF: torch.Tensor, w_EHD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """grouped_mm(swiglu(h_NF), w_EHD, counts_E): the second GEMM of SwiGLU experts, [N, D].

    Where `backend` runs both swiglu and grouped_mm on the C++ ops, one fused op
    (csrc/swiglu_grouped_mm.cpp) that keeps no [N, H] activation for the backward and, with many
    small experts, runs each expert's SwiGLU, GEMMs and SwiGLU backward together on one thread.
    Otherwise the two ops one after the other; the results are the same either way.
    """
    if _cpp_swiglu_and_gemm(backend, h_NF.device) and cpp.fused_swiglu_grouped_mm(h_NF.device):
        return cpp.swiglu_grouped_mm(h_NF, w_EHD, counts_E)
    return grouped_mm(swiglu(h_NF, backend), w_EHD, counts_E, backend)


def swiglu_experts(
    x_ND: torch.Tensor, w_in_EDF: torch.Tensor, w_out_EHD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """The SwiGLU expert MLP on rows sorted by expert: swiglu_grouped_mm(grouped_mm(x_ND, w_in_EDF), w_out_EHD), [N, D].

    Where `backend` runs swiglu and grouped_mm on the C++ ops, one op whose backward takes each
    thread's rows through both GEMMs' gradients while they are in cache: the [N, 2H] gradient of
    the first GEMM never exists whole (csrc/swiglu_grouped_mm.cpp). Otherwise the two ops.
    """
    if _cpp_swiglu_and_gemm(backend, x_ND.device) and cpp.fused_swiglu_experts(x_ND.device):
        return cpp.swiglu_experts(x_ND, w_in_EDF, w_out_EHD, counts_E)
    return swiglu_grouped_mm(grouped_mm(x_ND, w_in_EDF, counts_E, backend), w_out_EHD, counts_E, backend)


def _cpp_swiglu_and_gemm(backend: str, device: torch.device) -> bool:
    """Whether `backend` runs both swiglu and grouped_mm on the C++ ops on `device` (then the fused ops may serve)."""
    return (
        registry.resolve("swiglu", backend, device) is cpp.swiglu
        and registry.resolve("grouped_mm", backend, device) is cpp.grouped_mm
    )
