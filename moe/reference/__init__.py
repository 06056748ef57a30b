"""Pure-PyTorch reference ops: the CPU fallback and the oracle every fast path is tested against.

Shapes: T tokens, D features, E experts, N dispatched token copies, M rows of a grouped GEMM.
Expert id -1 means "not routed / dropped" everywhere.
"""

from moe.reference.count import count_tokens, sort_by_expert
from moe.reference.grouped_mm import grouped_mm, grouped_mm_wgrad, segment_ends
from moe.reference.permute import permute
from moe.reference.swiglu import swiglu, swiglu_backward
from moe.reference.unpermute import unpermute, unpermute_backward

__all__ = [
    "count_tokens",
    "sort_by_expert",
    "permute",
    "unpermute",
    "unpermute_backward",
    "grouped_mm",
    "grouped_mm_wgrad",
    "segment_ends",
    "swiglu",
    "swiglu_backward",
]
