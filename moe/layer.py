"""MoE: router -> (capacity) -> dispatch -> experts -> combine (+ shared experts). A drop-in MLP.

Shape legend: T tokens (all leading dims flattened), D dim, E experts, K top-k, N copies.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from moe.config import MoEConfig, ParallelConfig, RouterConfig, router_config
from moe.dispatch import Dispatcher, LocalDispatcher
from moe.experts import MLP, Experts, shared_output
from moe.reference import count_tokens
from moe.routing import Router, build_router
from moe.routing.capacity import drop_over_capacity

__all__ = ["MoE", "MoEStats", "max_violation", "residual_mix"]


@dataclass
class MoEStats:
    """Routing statistics of the latest forward (real tokens only).

    tokens_per_expert: [E] int64 copies the router assigned to each expert (before capacity).
    dropped_tokens: copies dropped by the capacity limit.
    max_violation: MaxVio = (max_i load_i - mean load) / mean load (0 = perfectly balanced).
    """

    tokens_per_expert: torch.Tensor
    dropped_tokens: int
    max_violation: float


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio of one load vector: (max load - mean load) / mean load.

    Args:
        load_E: [E] tokens (or copies) routed to each expert.
    Returns:
        a float >= 0; 0.0 when there are no experts or no load.
    """
    load = load_E.float()
    mean = load.mean()
    return 0.0 if load.numel() == 0 or mean <= 0 else float((load.max() - mean) / mean)


class MoE(nn.Module):
    """A Mixture-of-Experts MLP: y = layer(x) for x [..., dim], same shape and dtype.

    Args:
        dim: D, input and output width.
        hidden_dim: H, hidden width of each routed expert.
        num_experts: E, routed experts.
        top_k: K, experts per token.
        router: "topk" | "aux_free" | "recurrent" | "expert_choice", or a Router module.
        num_shared_experts: always-on experts (ungated, DeepSeekMoE) merged into one MLP.
        shared_expert_hidden_dim: width of that MLP (default num_shared_experts * hidden_dim).
        shared_expert_gate: scale shared output by sigmoid(x w_g) (Qwen2-MoE).
        capacity_factor: None/0 = dropless (default). > 0: each expert keeps at most
            ceil(cf * T * K / E) copies; first choices win over second choices, then earlier
            tokens over later ones; dropped copies contribute 0 and are counted in stats. A
            token with a non-finite input is routed nowhere, so it cannot take another's slot.
        activation: "swiglu", "gelu" or "swiglu_oai" (GPT-OSS's clamped SwiGLU; swiglu_alpha, swiglu_limit).
        expert_bias: routed experts with biases b_in [E, F], b_out [E, D] (GPT-OSS); one device only.
        backend: op backend, "auto" (fastest correct per device) or a name in moe.ops.registry.
        router_config: the router's config dataclass (alternative to **router_options).
        process_group: None (single process) or a torch.distributed group: experts are stored
            sharded by global id over its ranks and run expert-parallel (moe.parallel).
        parallel: moe.ParallelConfig (pinned plan, planner knobs, hierarchical all-to-all) for
            the expert-parallel layer; None = ParallelConfig() when process_group is given.
        residual: Residual MoE (DeepSpeed's use_residual=True): a dense MLP branch
            (`residual_mlp`, width residual_hidden_dim, default hidden_dim) mixed with the MoE
            output by a learned per-token coefficient (`residual_coef`, Linear(D, 2) with bias):
            c = softmax(residual_coef(x)), y = moe(x) * c[..., 0:1] + residual_mlp(x) * c[..., 1:].
            moe(x) includes the shared experts. Under expert parallelism the dense branch is
            replicated like any non-expert weight, and it runs while the dispatch is in flight.
        residual_hidden_dim: width of the dense branch (needs residual=True).
        parallel_plan, planner_config: deprecated, use parallel=ParallelConfig(plan=...,
            planner=...).
        **router_options: fields of the router's config, e.g. aux_loss_coef=1e-2, n_group=4.

    After each forward: `layer.aux_losses` (weighted, summed by moe.aux_loss(model)) and
    `layer.stats` (MoEStats). forward also takes token_mask [...] bool (False = padding,
    excluded from losses, statistics and aux-free load counts).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        router: str | Router = "topk",
        *,
        num_shared_experts: int = 0,
        shared_expert_hidden_dim: int | None = None,
        shared_expert_gate: bool = False,
        capacity_factor: float | None = None,
        activation: str = "swiglu",
        backend: str = "auto",
        router_config: RouterConfig | None = None,
        process_group: Any = None,
        parallel: ParallelConfig | None = None,
        residual: bool = False,
        residual_hidden_dim: int | None = None,
        parallel_plan: Any = None,
        planner_config: Any = None,
        expert_bias: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        **router_options: Any,
    ) -> None:
        super().__init__()
        parallel = _parallel_config(process_group, parallel, parallel_plan, planner_config)
        custom_router = router if isinstance(router, nn.Module) else None
        if custom_router is not None and not isinstance(custom_router, Router):
            raise TypeError(f"router module must subclass moe.routing.Router, got {type(router).__name__}")
        name = "topk" if custom_router is not None else router
        if router_config is not None and router_options:
            raise TypeError("pass router options either as router_config or as keywords, not both")
        if custom_router is None and router_config is None and isinstance(name, str):
            router_config = _router_config(name, router_options)
        self.config = MoEConfig(
            dim=dim,
            hidden_dim=hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            router=name,  # type: ignore[arg-type]
            router_config=router_config if custom_router is None else None,
            activation=activation,  # type: ignore[arg-type]
            num_shared_experts=num_shared_experts,
            shared_expert_hidden_dim=shared_expert_hidden_dim,
            shared_expert_gate=shared_expert_gate,
            capacity_factor=capacity_factor,
            backend=backend,  # type: ignore[arg-type]
            parallel=parallel,
            expert_bias=expert_bias,
            swiglu_alpha=swiglu_alpha,
            swiglu_limit=swiglu_limit,
            residual=residual,
            residual_hidden_dim=residual_hidden_dim,
        )
        cfg = self.config
        self._custom_router = custom_router is not None
        if custom_router is not None:
            if getattr(custom_router, "num_experts", num_experts) != num_experts:
                raise ValueError(f"router.num_experts ({custom_router.num_experts}) != num_experts ({num_experts})")
            self.router: Router = custom_router
        else:
            assert cfg.router_config is not None
            self.router = build_router(dim, num_experts, top_k, cfg.router_config)
        # Expert parallel (moe.parallel): this rank stores only its shard of the experts.
        self.parallel = _expert_parallel(self.config, process_group)
        self.experts: Experts = (
            Experts(
                num_experts,
                dim,
                hidden_dim,
                activation,
                backend,
                bias=expert_bias,
                alpha=swiglu_alpha,
                limit=swiglu_limit,
            )
            if self.parallel is None
            else self.parallel.experts
        )
        self.shared_experts = MLP(dim, cfg.shared_hidden_dim, activation) if num_shared_experts else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_expert_gate else None
        # Residual MoE: the dense branch and DeepSpeed's two-way coefficient (with its bias).
        self.residual_mlp = MLP(dim, cfg.residual_dim, activation) if cfg.residual else None
        self.residual_coef = nn.Linear(dim, 2) if cfg.residual else None
        # One device: LocalDispatcher; across ranks: the ExpertParallelDispatcher the runtime drives.
        self.dispatcher: Any = (
            LocalDispatcher(num_experts, backend) if self.parallel is None else self.parallel.dispatcher
        )
        self.aux_losses: dict[str, torch.Tensor] = {}
        self._load: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: MoEConfig, *, process_group: Any = None) -> MoE:
        """Builds the layer `config` describes; `layer.config == config`.

        process_group: the torch.distributed group of an expert-parallel layer (config.parallel
        describes how it runs; None there = ParallelConfig() defaults). A config with `parallel`
        set needs a process_group: the group is a live object, so it is given here, not in the config.
        """
        return cls(
            config.dim,
            config.hidden_dim,
            config.num_experts,
            config.top_k,
            config.router,
            num_shared_experts=config.num_shared_experts,
            shared_expert_hidden_dim=config.shared_expert_hidden_dim,
            shared_expert_gate=config.shared_expert_gate,
            capacity_factor=config.capacity_factor,
            activation=config.activation,
            backend=config.backend,
            router_config=config.router_config,
            process_group=process_group,
            parallel=config.parallel,
            expert_bias=config.expert_bias,
            swiglu_alpha=config.swiglu_alpha,
            swiglu_limit=config.swiglu_limit,
            residual=config.residual,
            residual_hidden_dim=config.residual_hidden_dim,
        )

    @property
    def stats(self) -> MoEStats:
        """Statistics of the latest forward (zeros before the first one)."""
        e = self.config.num_experts
        load = self._load if self._load is not None else torch.zeros(e, dtype=torch.int64)
        dropped = int(self._dropped) if self._dropped is not None else 0
        return MoEStats(load.detach().cpu(), dropped, max_violation(load))

    def _check_input(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoE expects floating-point input, got {x.dtype}; convert with x.float()")
        if x.dim() == 0 or x.shape[-1] != self.config.dim:
            raise ValueError(f"input's last dim must be dim={self.config.dim}, got shape {tuple(x.shape)}")
        param = self.experts.w_in
        if x.device != param.device:
            raise ValueError(
                f"input is on {x.device} but the layer's parameters are on {param.device}; "
                "move one of them with .to(device)"
            )
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input is {x.dtype} but the layer's weights are {param.dtype}; call "
                f"layer.to({x.dtype}) or run under torch.autocast"
            )
        if token_mask is not None:
            if token_mask.dtype != torch.bool or token_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_mask must be bool of shape {tuple(x.shape[:-1])}, got {token_mask.dtype} "
                    f"{tuple(token_mask.shape)}"
                )
            if token_mask.device != x.device:
                raise ValueError(f"token_mask is on {token_mask.device} but input is on {x.device}")

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """y = routed experts(x) (+ shared experts(x)): one path on one device and across ranks.

            x [..., D] -> x_TD [T, D]                      (T = all leading dims)
            router(x_TD) -> Routing: ids [T, K], weights [T, K]
            capacity (capacity_factor > 0): copies past an expert's capacity -> id -1, weight 0
            dispatcher: dispatch -> x_sorted [N, D], counts [E_local]   (N = routing.max_copies)
            experts(x_sorted, counts) -> y_sorted [N, D]
            dispatcher: combine -> y_TD [T, D] (gate-weighted sum, fp32)
            + shared experts(x_TD) [T, D]                (the dispatcher may overlap them)
            -> y [..., D] in x's dtype

        The dispatcher is LocalDispatcher on one device (fused gather/GEMM/weighting when the
        experts support it) or, with process_group, the ExpertParallel runtime (all-to-all,
        planned and pipelined). Sets `aux_losses` and `stats`.

        Args:
            x: [..., D] floating point, on the layer's device.
            token_mask: [...] bool, False = padding (excluded from losses, stats, load counts).

        Returns:
            [..., D], same shape and dtype as x.
        """
        self._check_input(x, token_mask)
        cfg = self.config
        shape, in_dtype = x.shape, x.dtype
        x_TD = x.reshape(-1, cfg.dim)
        if torch.is_autocast_enabled(x.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        mask_T = None if token_mask is None else token_mask.reshape(-1)
        seq_len = shape[-2] if x.dim() >= 3 else None

        routing = self.router(x_TD, token_mask=mask_T, seq_len=seq_len)
        if self._custom_router:  # ours are right by construction; a user's gets checked (one host sync)
            routing.check(x_TD.shape[0], cfg.num_experts)
        with torch.no_grad():
            counted = routing.expert_ids if mask_T is None else torch.where(mask_T.unsqueeze(1), routing.expert_ids, -1)
            self._load = count_tokens(counted, cfg.num_experts)
        self._dropped = None
        if not cfg.dropless:
            assert cfg.capacity_factor is not None
            routing, self._dropped = drop_over_capacity(routing, x_TD, cfg.num_experts, cfg.capacity_factor, mask_T)

        # dispatch -> experts -> combine; the shared experts (and the Residual MoE dense branch)
        # go along as work the dispatcher may overlap.
        mlp, gate = self.shared_experts, self.shared_expert_gate
        shared = None if mlp is None else partial(shared_output, mlp, gate)
        if self.residual_mlp is None:
            y_TD, shared_TD = self._dispatcher().run(x_TD, routing, self.experts, shared)
            residual_TD = None
        else:
            dense = cast(Any, partial(_dense_branches, shared, self.residual_mlp))
            y_TD, branches = self._dispatcher().run(x_TD, routing, self.experts, dense)
            shared_TD, residual_TD = cast(tuple, branches)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        if residual_TD is not None:
            assert self.residual_coef is not None
            y_TD = residual_mix(y_TD, residual_TD, self.residual_coef(x_TD))
        self.aux_losses = routing.aux_losses
        return y_TD.to(in_dtype).view(shape)

    def _dispatcher(self) -> Dispatcher:
        """The dispatcher of this layer's path: the expert-parallel runtime across ranks (it plans
        and drives `self.dispatcher`, its ExpertParallelDispatcher), else `self.dispatcher`."""
        return self.parallel if self.parallel is not None else self.dispatcher

    def __getstate__(self) -> dict:
        # aux_losses of the last forward belong to its autograd graph: a copy (copy.deepcopy for
        # an EMA or evaluation model, pickling) starts without them.
        state = dict(self.__dict__)
        state["aux_losses"] = {}
        return state

    def _shared_output(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """Deprecated: moe.experts.shared_output(layer.shared_experts, layer.shared_expert_gate, x_TD)."""
        warnings.warn(
            "MoE._shared_output is deprecated; use moe.experts.shared_output(layer.shared_experts, "
            "layer.shared_expert_gate, x_TD)",
            DeprecationWarning,
            stacklevel=2,
        )
        return shared_output(self.shared_experts, self.shared_expert_gate, x_TD)

    def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
        """Called by DeepSpeed's engine on every module that has it: refuses unprepared expert-parallel layers."""
        if self.parallel is not None:  # the engine would all-reduce and broadcast our sharded experts as dense
            raise ValueError(
                "an expert-parallel moe.MoE (process_group=...) was passed to deepspeed.initialize unprepared: "
                "DeepSpeed would merge the experts of different ranks; build it without process_group and call "
                "moe.integrations.deepspeed.prepare(model, ep_size=...) first"
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"router={type(self.router).__name__}, shared={c.num_shared_experts}, "
            f"capacity_factor={c.capacity_factor}, activation={c.activation}, backend={c.backend}"
            + (f", residual_hidden_dim={c.residual_dim}" if c.residual else "")
        )


def residual_mix(moe_TD: torch.Tensor, mlp_TD: torch.Tensor, logits_T2: torch.Tensor) -> torch.Tensor:
    """Residual MoE's mix, as deepspeed.moe.layer.MoE(use_residual=True):
    c = softmax(logits [T, 2]); moe [T, D] * c[:, 0:1] + mlp [T, D] * c[:, 1:] (softmax in fp32 or wider)."""
    coef = torch.softmax(logits_T2.to(torch.promote_types(logits_T2.dtype, torch.float32)), dim=-1)
    return moe_TD * coef[..., 0:1] + mlp_TD * coef[..., 1:]


def _dense_branches(
    shared: Any, residual_mlp: nn.Module, x_TD: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The layer's dense work, run while the dispatch is in flight: (shared experts or None, dense branch)."""
    return (shared(x_TD) if shared is not None else None), residual_mlp(x_TD)


def _parallel_config(group: Any, parallel: ParallelConfig | None, plan: Any, planner: Any) -> ParallelConfig | None:
    """The layer's ParallelConfig from the new keyword or the deprecated parallel_plan / planner_config."""
    if plan is not None or planner is not None:
        warnings.warn(
            "MoE(parallel_plan=..., planner_config=...) is deprecated; pass "
            "parallel=moe.ParallelConfig(plan=..., planner=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        if parallel is not None:
            raise TypeError("pass either parallel=ParallelConfig(...) or parallel_plan/planner_config, not both")
        parallel = ParallelConfig(plan=plan, planner=planner)
    if parallel is not None and not isinstance(parallel, ParallelConfig):
        raise TypeError(f"parallel must be None or a moe.ParallelConfig, got {type(parallel).__name__}")
    if group is None:
        if parallel is not None:
            raise ValueError(
                "parallel (or parallel_plan / planner_config) describes an expert-parallel layer but no "
                "process_group was given; pass process_group=group (MoE.from_config(cfg, process_group=group))"
            )
        return None
    return parallel if parallel is not None else ParallelConfig()


def _expert_parallel(config: MoEConfig, group: Any) -> Any:
    if group is None:
        return None
    from moe.parallel import ExpertParallel  # torch.distributed only when asked for

    p = config.parallel
    assert p is not None
    return ExpertParallel(config, group, p.plan, p.planner, p.local_size)


def _router_config(name: str, options: dict[str, Any]) -> RouterConfig:
    return router_config(name, **options)
