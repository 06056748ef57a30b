"""The one place where an op's backend is chosen.

Each op (sort_by_expert, permute, unpermute, grouped_mm, swiglu) has implementations registered per
backend. Layers pass their `backend` setting through; "auto" takes the first available
backend in the device's priority order. Registration happens when a backend module is
imported (a static table, like torch.library itself), never at layer construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["OPS", "AUTO_PRIORITY", "register", "register_delegate", "backends_for", "resolve"]


OPS = ("sort_by_expert", "permute", "unpermute", "grouped_mm", "swiglu")

# Fastest first. A backend appears only once it has registered an implementation.
AUTO_PRIORITY = {
    "cuda": ("triton", "cpp", "torch", "reference"),
    "cpu": ("cpp", "torch", "reference"),
}

_IMPLS: dict[tuple[str, str], tuple[Callable[..., Any], Callable[[torch.device], bool]]] = {}
_DELEGATES: set[tuple[str, str]] = set()


def register(
    op: str, backend: str, fn: Callable[..., Any], available: Callable[[torch.device], bool] = lambda d: True
) -> None:
    """Registers `fn` as `backend`'s implementation of `op`; `available(device)` says where it runs."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    _IMPLS[(op, backend)] = (fn, available)
    _DELEGATES.discard((op, backend))


def register_delegate(op: str, backend: str, available: Callable[[torch.device], bool]) -> None:
    """Lets `backend` run `op` by handing it to the fastest backend with its own implementation.

    For backends that provide only some ops (Triton and torch._grouped_mm provide grouped_mm),
    so that backend="triton" works for a whole layer. Delegates never hand an op to another
    delegate, so two partial backends cannot bounce an op between them.
    """

    def run(first: torch.Tensor, *args: Any) -> Any:
        own = [b for b in backends_for(op, first.device) if (op, b) not in _DELEGATES]
        return _IMPLS[(op, own[0] if own else "reference")][0](first, *args)

    register(op, backend, run, available)
    _DELEGATES.add((op, backend))


def backends_for(op: str, device: torch.device) -> list[str]:
    """Backends that can run `op` on `device`, in auto priority order."""
    order = AUTO_PRIORITY.get(device.type, ("reference",))
    return [b for b in order if (op, b) in _IMPLS and _IMPLS[(op, b)][1](device)]


def resolve(op: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """Returns the implementation of `op` for `backend` ("auto" = fastest available) on `device`."""
    if backend == "auto":
        candidates = backends_for(op, device)
        if not candidates:
            raise RuntimeError(f"no backend implements {op} on {device}")
        return _IMPLS[(op, candidates[0])][0]
    entry = _IMPLS.get((op, backend))
    if entry is None or not entry[1](device):
        raise ValueError(
            f"backend {backend!r} cannot run {op} on {device}; available there: "
            f"{backends_for(op, device)} (use backend='auto' to pick automatically)"
        )
    return entry[0]
