"""Expert parallelism: sharded experts, all-to-all dispatch/combine, layouts, pipelining, planner.

`moe.MoE(..., process_group=group)` turns it on; see moe.parallel.runtime.ExpertParallel.
"""

from moe.parallel.checkpoint import load_checkpoint, save_checkpoint
from moe.parallel.comm import all_to_all, check_same_config, hierarchical_all_to_all
from moe.parallel.dispatcher import ExpertParallelDispatcher
from moe.parallel.experts import ParallelExperts
from moe.parallel.layout import valid_modes
from moe.parallel.planner import Plan, Planner, PlannerConfig
from moe.parallel.runtime import ExpertParallel

__all__ = [
    "ExpertParallel",
    "ExpertParallelDispatcher",
    "ParallelExperts",
    "Plan",
    "Planner",
    "PlannerConfig",
    "all_to_all",
    "hierarchical_all_to_all",
    "check_same_config",
    "valid_modes",
    "save_checkpoint",
    "load_checkpoint",
]
