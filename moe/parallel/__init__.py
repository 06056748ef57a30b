"""Expert parallelism: sharded experts, all-to-all dispatch/combine, layouts, pipelining, planner.

`moe.MoE(..., process_group=group)` turns it on; see moe.parallel.expert_parallel.ExpertParallel.
"""

from moe.parallel.alltoall import all_to_all, check_same_config, hierarchical_all_to_all
from moe.parallel.dispatcher import ExpertParallelDispatcher
from moe.parallel.expert_parallel import ExpertParallel
from moe.parallel.layout import valid_modes
from moe.parallel.planner import Plan, Planner, PlannerConfig
from moe.parallel.sharded_checkpoint import load_checkpoint, save_checkpoint
from moe.parallel.sharded_experts import ParallelExperts

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
