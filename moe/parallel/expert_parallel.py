"""ExpertParallel: what moe.MoE(..., process_group=...) runs instead of the local data path.

It owns the expert-parallel dispatcher and the adaptive planner; the layer owns the
ParallelExperts module (so parameters and state_dict keys stay on the layer).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.dispatch import Dispatcher
from moe.parallel.alltoall import check_same_config, warn_if_device_unset
from moe.parallel.dispatcher import ExpertParallelDispatcher
from moe.parallel.layout import valid_modes
from moe.parallel.planner import Plan, Planner, PlannerConfig, timer
from moe.parallel.sharded_experts import ParallelExperts
from moe.reference import count_tokens
from moe.routing.base import Routing

__all__ = ["config_fingerprint", "ExpertParallel"]


def _code(text: str) -> int:
    return zlib.crc32(text.encode())


def config_fingerprint(
    config: MoEConfig, world: int, plan: Plan | None = None, planner: str = "", local_size: int | None = None
) -> dict[str, int]:
    """The integer fields every rank's layer must agree on (ranks that run different plans would
    issue different collectives: a crash on gloo, a hang or garbage on NCCL)."""
    return {
        "num_experts": config.num_experts,
        "dim": config.dim,
        "hidden_dim": config.hidden_dim,
        "top_k": config.top_k,
        "activation": _code(str(config.activation)),
        "router": _code(str(config.router)),
        "num_shared_experts": config.num_shared_experts,
        "world_size": world,
        "pinned_mode": -1 if plan is None else plan.mode,
        "pinned_chunks": -1 if plan is None else plan.chunks,
        "planner_config": _code(planner),
        "local_size": local_size or 0,
    }


class _OnGrad(torch.autograd.Function):
    """Identity whose backward calls `callback` when the gradient arrives (to time a backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, callback: Callable[[], None]) -> torch.Tensor:  # type: ignore[override]
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.callback()
        return grad, None


class ExpertParallel(Dispatcher):
    """The dispatcher of an expert-parallel layer: dispatch -> experts -> combine across a process group.

    run (what MoE.forward calls) picks the plan (mode and pipeline degree) and runs it on its
    ExpertParallelDispatcher; dispatch/combine are the unpipelined seam in the last plan's mode
    (expert parallel, mode 1, before the first run).

    Args:
        config: the layer's MoEConfig.
        group: the expert-parallel process group (every rank of it must build the same layers
            in the same order: construction checks the config with one all_gather).
        plan: None (adaptive), or a Plan / "ep/d=2"-style string pinning mode and degree.
        planner_config: PlannerConfig for the adaptive planner.
        local_size: ranks per node for the hierarchical all-to-all (None = flat).
    """

    def __init__(
        self,
        config: MoEConfig,
        group: Any,
        plan: Plan | str | None = None,
        planner_config: PlannerConfig | None = None,
        local_size: int | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialized; call "
                "dist.init_process_group(...) first (torchrun sets the environment)"
            )
        self.group = group
        warn_if_device_unset(group)
        world = dist.get_world_size(group)
        pinned = Plan.parse(plan) if isinstance(plan, str) else plan
        check_same_config(config_fingerprint(config, world, pinned, repr(planner_config), local_size), group)
        self.num_experts = config.num_experts
        self.experts = ParallelExperts(
            config.num_experts, config.dim, config.hidden_dim, config.activation, config.backend, group
        )
        self.dispatcher = ExpertParallelDispatcher(config.num_experts, group, config.backend, local_size)
        self.modes = valid_modes(config.num_experts, config.hidden_dim, world)
        self.planner = Planner(
            self.modes,
            group,
            planner_config,
            None if pinned is None else pinned.mode,
            None if pinned is None else pinned.chunks,
        )
        self.last_plan: Plan | None = None
        # A measured training step is recorded when its backward has run (plan, forward seconds,
        # copies, load); a forward whose backward never came is recorded forward-only.
        self._pending: tuple[Plan, float, int, torch.Tensor] | None = None

    def pin(self, plan: Plan | str | None) -> None:
        """Pins a plan (None = adaptive again). Safe between any two forward calls, when every rank
        of the group pins the same plan before the same call."""
        p = Plan.parse(plan) if isinstance(plan, str) else plan
        self.planner.pin(None if p is None else p.mode, None if p is None else p.chunks)

    def report(self) -> dict[str, Any]:
        """The planner's choice, reason and per-candidate timings (see Planner.report)."""
        return self.planner.report()

    def _mode(self) -> int:
        return self.last_plan.mode if self.last_plan is not None else (1 if 1 in self.modes else self.modes[0])

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Unpipelined dispatch in the current mode: (rows of this rank's experts [R, D], counts [E_b], handle).
        Feed the rows to experts(x, counts, experts.weights(mode)) where mode = handle.mode."""
        return self.dispatcher.dispatch(x_TD, routing, self._mode())

    def combine(self, y_sorted: torch.Tensor, state: Any) -> torch.Tensor:
        """Unpipelined combine: expert outputs [R, D] of dispatch's rows and its handle -> y_TD [T, D]."""
        return self.dispatcher.combine(y_sorted, state)

    def __call__(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ParallelExperts,
        shared_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Deprecated form of run: y_TD [T, D] = routed experts (+ shared_fn(x_TD))."""
        warnings.warn(
            "calling ExpertParallel(...) is deprecated; use run(x_TD, routing, experts, overlap) -> (y_TD, overlap)",
            DeprecationWarning,
            stacklevel=2,
        )
        y_TD, shared = self.run(x_TD, routing, experts, shared_fn)
        return y_TD if shared is None else y_TD + shared

    def run(  # type: ignore[override]
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ParallelExperts,
        overlap: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y_TD [T, D] of the routed experts, overlap(x_TD)) with the planned mode and pipelining;
        overlap (the shared experts) runs while the dispatch is in flight."""
        if torch._C._current_graph_task_id() != -1 and self.last_plan is not None:
            # Recomputed inside backward (activation checkpointing): the plan of the forward, or
            # the recomputed tensors would not match the saved ones; and no timing from backward.
            plan, measure = self.last_plan, False
        else:
            self._record_pending()
            plan, measure = self.planner.choose()
        device = x_TD.device
        # A plan's cost includes its backward (chunking, for one, pays there): when a gradient
        # will flow back through this layer, the measurement ends when it has.
        with_backward = measure and torch.is_grad_enabled() and x_TD.requires_grad
        marks: dict[str, float] = {}
        x_run = _OnGrad.apply(x_TD, lambda: self._record_pending(marks)) if with_backward else x_TD
        start = self._now(device, measure)
        y_TD, shared = self.dispatcher.run(x_run, routing, experts, plan.mode, plan.chunks, overlap)
        if measure:
            forward = self._now(device, True) - start
            copies = int((routing.expert_ids >= 0).sum())
            load = count_tokens(routing.expert_ids, self.num_experts)
            self._pending = (plan, forward, copies, load)
            if with_backward:
                y_TD = _OnGrad.apply(y_TD, lambda: marks.__setitem__("start", self._now(device, True)))
            else:
                self._record_pending()
        self.last_plan = plan
        return y_TD, shared

    @staticmethod
    def _now(device: torch.device, sync: bool) -> float:
        if sync and device.type == "cuda":  # time the work, not its launch: CUDA runs asynchronously
            torch.cuda.synchronize(device)
        return timer()

    def _record_pending(self, marks: dict[str, float] | None = None) -> None:
        """Records the pending measurement: forward + backward when called at the end of the
        layer's backward (marks holds its start), else forward only. Same point on every rank."""
        if self._pending is None:
            return
        plan, seconds, copies, load = self._pending
        self._pending = None
        if marks is not None and "start" in marks:
            seconds += self._now(load.device, True) - marks["start"]
        self.planner.record(plan, seconds, copies, load)
