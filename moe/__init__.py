"""MoE runtime for PyTorch: drop-in Mixture-of-Experts layers, routers and fast paths.

`import moe` does no work: no extension builds, no device probing, no process groups.
"""

from moe import _source_tree
from moe.config import (
    AuxFreeConfig,
    ExpertChoiceConfig,
    MoEConfig,
    ParallelConfig,
    PlannerConfig,
    RecurrentConfig,
    TopKConfig,
)
from moe.cpu_memory import keep_freed_memory
from moe.layer import MoE, MoEStats
from moe.model_utils import aux_loss, update_routers
from moe.routing import Router, Routing, tie_recurrent_routers

_source_tree.register_kernels()  # moe.kernels from kernels/ in a checkout (no import of it)

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEConfig",
    "MoEStats",
    "TopKConfig",
    "AuxFreeConfig",
    "RecurrentConfig",
    "ExpertChoiceConfig",
    "ParallelConfig",
    "PlannerConfig",
    "Router",
    "Routing",
    "aux_loss",
    "update_routers",
    "tie_recurrent_routers",
    "keep_freed_memory",
]
