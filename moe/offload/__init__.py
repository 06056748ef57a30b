"""Offloaded MoE inference: tiered expert store, cache policies, predictive prefetch, traces.

    cfg = moe.offload.OffloadConfig(expert_cache_bytes=4 << 30, policy="predictive")
    om = moe.offload.load("model_dir", "cuda", config=cfg)
    om.model.generate(...); print(om.runtime.stats.hit_rate)

Importing this package loads no model and probes no device; transformers is imported by load() only.
"""

from moe.offload.batched import BatchedRun, Request, RequestResult, generate_batched
from moe.offload.cache import BudgetError, CacheStats, Residency
from moe.offload.checkpoint import CheckpointError
from moe.offload.cost import CostModel, measure
from moe.offload.engine import MIN_CONFIDENCE, CacheEngine
from moe.offload.loader import OffloadedModel, load
from moe.offload.policies import LFU, LRU, POLICIES, Belady, Policy, Predictive, make_policy
from moe.offload.runtime import OffloadConfig, OffloadedExperts, OffloadRuntime
from moe.offload.schedule import SCHEDULERS, BatchQueue, SchedulerConfig, TokenRoutes, pick_batch
from moe.offload.simulate import iid_hit_rate, shuffled, simulate
from moe.offload.store import ExpertShape, ExpertStore
from moe.offload.synthetic import SyntheticConfig, synthetic_trace
from moe.offload.trace import Trace, TraceBuilder, TraceRecorder

__all__ = [
    "load",
    "OffloadedModel",
    "OffloadConfig",
    "OffloadRuntime",
    "OffloadedExperts",
    "ExpertStore",
    "ExpertShape",
    "Residency",
    "CacheEngine",
    "MIN_CONFIDENCE",
    "CacheStats",
    "BudgetError",
    "CheckpointError",
    "CostModel",
    "measure",
    "Policy",
    "LRU",
    "LFU",
    "Predictive",
    "Belady",
    "POLICIES",
    "make_policy",
    "Trace",
    "TraceBuilder",
    "TraceRecorder",
    "simulate",
    "shuffled",
    "iid_hit_rate",
    "SyntheticConfig",
    "synthetic_trace",
    "generate_batched",
    "Request",
    "RequestResult",
    "BatchedRun",
    "SchedulerConfig",
    "SCHEDULERS",
    "BatchQueue",
    "pick_batch",
    "TokenRoutes",
]
