"""Backend "triton": the Triton grouped GEMMs of moe.kernels, and the fused expert MLP.

Shape legend: T tokens, D dim, H expert hidden dim, F = 2H (SwiGLU) or H (GELU), E experts,
N dispatched copies (rows sorted by expert; rows past counts.sum() are padding).

Availability: on CUDA wherever Triton is installed ("auto" picks it first there). On CPU the
kernels run in Triton's interpreter, which is for tests only: the registry's CPU auto order
does not list "triton", so only an explicit backend="triton" reaches it. Importing this module
imports neither Triton nor moe.kernels; both are imported the first time a kernel runs.
The other ops (sort, permute, unpermute, ...) have no Triton kernels here: under
backend="triton" they run on the fastest other backend, so a layer can use backend="triton".
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F

from moe.ops import registry

__all__ = ["NAME", "triton_installed", "kernel_ops", "available", "uses_triton", "expert_mlp"]


NAME = "triton"


@functools.cache
def triton_installed() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernel_ops() -> ModuleType:
    """moe.kernels.ops (installed; in a source tree `import moe` maps moe.kernels to kernels/ beside moe/)."""
    try:
        return importlib.import_module("moe.kernels.ops")
    except ModuleNotFoundError as err:
        if err.name not in ("moe.kernels", "moe.kernels.ops"):
            raise
        raise ModuleNotFoundError(
            "moe.kernels is missing from this installation of moe; reinstall it: pip install .", name=err.name
        ) from err


def available(device: torch.device) -> bool:
    """CUDA, or CPU through the interpreter (explicit backend="triton" only), with Triton installed."""
    return device.type in ("cuda", "cpu") and triton_installed()


def uses_triton(backend: str, device: torch.device) -> bool:
    """Whether `backend` resolves to the Triton grouped GEMM on `device` (the fused expert path)."""
    if backend == NAME:
        return available(device)
    return backend == "auto" and registry.backends_for("grouped_mm", device)[:1] == [NAME]


def _grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return kernel_ops().grouped_mm(x_MK, w_EKN, counts_E)


def expert_mlp(
    x_TD: torch.Tensor,
    w_in_EDF: torch.Tensor,
    w_out_EHD: torch.Tensor,
    counts_E: torch.Tensor,
    token_idx_N: torch.Tensor,
    weights_N: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """weights_N * expert_MLP(x_TD[token_idx_N]) in two grouped GEMMs, no x_sorted materialised.

    SwiGLU: h = swiglu(gather(x) @ w_in) in one kernel (gather in the loads, activation in the
    epilogue); GELU: gelu between the GEMMs. The second GEMM applies the gate weights to its fp32
    accumulator, so the caller only sums rows into tokens (unweighted).

    Args:
        x_TD: [T, D] tokens.
        w_in_EDF: [E, D, F]; F = 2H with SwiGLU (columns [:H] gate, [H:] up), H with GELU.
        w_out_EHD: [E, H, D].
        counts_E: [E] int64 rows per expert.
        token_idx_N: [N] int64 token of each expert-sorted row.
        weights_N: [N] gate weight of each row (0 for dropped copies).
        activation: "swiglu" or "gelu".

    Returns:
        [N, D] weighted expert outputs in x's dtype; rows past counts.sum() are zero.
    """
    kops = kernel_ops()
    if activation == "swiglu":
        h_NH = kops.gather_grouped_mm(x_TD, w_in_EDF, counts_E, token_idx_N, activation="swiglu")
    elif activation == "gelu":
        h_NH = F.gelu(kops.gather_grouped_mm(x_TD, w_in_EDF, counts_E, token_idx_N))
    else:
        raise ValueError(f"activation must be 'swiglu' or 'gelu' for backend='triton'; got {activation!r}")
    return kops.grouped_mm_weighted(h_NH, w_out_EHD, counts_E, weights_N)


registry.register("grouped_mm", NAME, _grouped_mm, available)
for _op in registry.OPS:
    if _op != "grouped_mm":
        registry.register_delegate(_op, NAME, available)
