"""Pure-PyTorch reference ops: the CPU fallback and the oracle every fast path is tested against.

Shapes: T tokens, D features, E experts, N dispatched token copies, M rows of a grouped GEMM.
Expert id -1 means "not routed / dropped" everywhere.
"""

from moe.reference.count import count_tokens, sort_by_expert
from moe.reference.grouped_mm import grouped_mm, grouped_mm_wgrad
from moe.reference.permute import permute
from moe.reference.swiglu import swiglu
from moe.reference.unpermute import unpermute

__all__ = ["count_tokens", "sort_by_expert", "permute", "unpermute", "grouped_mm", "grouped_mm_wgrad", "swiglu"]
