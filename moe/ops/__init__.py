"""The op layer the MoE layer calls; backends plug in through moe.ops.registry."""

from moe.ops import cpp as _cpp  # noqa: F401  (registers backend "cpp"; loads no extension)
from moe.ops import torch_grouped as _torch_grouped  # noqa: F401  (registers backend "torch")
from moe.ops import triton as _triton  # noqa: F401  (registers backend "triton"; imports no Triton)
from moe.ops.activation import swiglu, swiglu_experts, swiglu_grouped_mm
from moe.ops.grouped_mm import grouped_mm
from moe.ops.permute import permute, sort_by_expert
from moe.ops.registry import backends_for, resolve
from moe.ops.unpermute import unpermute

__all__ = [
    "sort_by_expert",
    "permute",
    "unpermute",
    "grouped_mm",
    "swiglu",
    "swiglu_grouped_mm",
    "swiglu_experts",
    "backends_for",
    "resolve",
]
