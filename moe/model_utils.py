"""Model-wide helpers: collect aux losses, update routers after the optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from moe.routing.base import Router

__all__ = ["aux_loss", "update_routers"]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the latest (weighted) aux losses of every module in `model` that has them.

    Call it after the forward whose losses you want; the next forward replaces them.
    Returns a scalar zero when there are none.
    """
    total: torch.Tensor | None = None
    for module in model.modules():
        losses = getattr(module, "aux_losses", None)
        if isinstance(losses, dict):
            for value in losses.values():
                total = value if total is None else total + value
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def update_routers(model: nn.Module) -> int:
    """Runs every router's post-step update (aux-free bias); call after optimizer.step().

    Returns the number of routers visited.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.update()
    return len(routers)
