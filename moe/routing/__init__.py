"""Routers: top-k softmax, DeepSeek-V3 aux-loss-free, layerwise recurrent (RMoE), expert choice."""

from __future__ import annotations

from moe.config import AuxFreeConfig, ExpertChoiceConfig, RecurrentConfig, RouterConfig, TopKConfig
from moe.routing.aux_free import AuxFreeRouter
from moe.routing.base import Router, Routing
from moe.routing.expert_choice import ExpertChoiceRouter
from moe.routing.recurrent import RecurrentCore, RecurrentRouter, tie_recurrent_routers
from moe.routing.topk import TopKRouter

_ROUTERS: dict[type, type[Router]] = {
    TopKConfig: TopKRouter,
    AuxFreeConfig: AuxFreeRouter,
    RecurrentConfig: RecurrentRouter,
    ExpertChoiceConfig: ExpertChoiceRouter,
}


def build_router(dim: int, num_experts: int, top_k: int, config: RouterConfig) -> Router:
    """The router module for a router config."""
    return _ROUTERS[type(config)](dim, num_experts, top_k, config)  # type: ignore[call-arg]


__all__ = [
    "Router",
    "Routing",
    "TopKRouter",
    "AuxFreeRouter",
    "RecurrentRouter",
    "RecurrentCore",
    "ExpertChoiceRouter",
    "tie_recurrent_routers",
    "build_router",
]
