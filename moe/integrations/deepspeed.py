"""DeepSpeed plugin: train moe.MoE layers with deepspeed.initialize, ZeRO 0/1/2 and expert parallelism.

    model = build_model()                                   # plain moe.MoE layers inside
    engine, opt, _, _ = moe_ds.initialize(model, config, ep_size=2)
    # = moe_ds.prepare(model, ep_size=2); deepspeed.initialize(...); moe_ds.check(engine)

DeepSpeed has no plugin API for MoE: its engine recognises MoE layers only by
isinstance(m, deepspeed.moe.layer.MoE). prepare() therefore turns each moe.MoE into a
DeepSpeedMoE (a subclass of both, with our forward), shards its experts over DeepSpeed's own
expert-parallel group "ep_size_<n>" (so our all-to-all runs on that group) and marks the
expert parameters (allreduce=False, group_name) so the engine reduces their gradients over the
expert-data-parallel group only and its ZeRO 1/2 optimizer puts them in MoE parameter groups.

Checkpoints: engine.save_checkpoint / load_checkpoint (after check(engine)) write DeepSpeed's
own layout, one file per *global* expert id (layer_<l>_expert_<g>_mp_rank_00_model_states.pt),
so the module weights load at any other EP size (load_optimizer_states=False when the EP size
or world size changes: DeepSpeed's optimizer shards follow its topology). export_safetensors()
writes one plain safetensors file with experts by global id (moe.parallel.save_checkpoint's
format), loadable with load_safetensors() into any EP size, or without DeepSpeed at all.

Not supported: ZeRO stage 3 (DeepSpeed partitions every parameter over all ranks, which
conflicts with experts stored on their EP rank: use stage 0, 1 or 2), ep_size that does not
divide num_experts, expert tensor parallelism. convert()/to_deepspeed() (moving from/to
deepspeed.moe.layer.MoE) live in moe.integrations.deepspeed_convert.

DeepSpeed is optional: `import moe` never imports it; this module needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe.config import ParallelConfig
from moe.layer import MoE
from moe.parallel.alltoall import collective_device

try:
    import deepspeed
    from deepspeed.moe.layer import MoE as _DeepSpeedNativeMoE
    from deepspeed.utils import groups as _groups
except ImportError as err:  # pragma: no cover - exercised only without deepspeed
    raise ImportError(
        "moe.integrations.deepspeed needs DeepSpeed: `pip install deepspeed` (DS_BUILD_OPS=0 skips "
        "building its CUDA ops at install time)"
    ) from err

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"
# DeepSpeed's checkpoint code treats every state_dict key of an MoE layer that contains
# "expert" as a routed-expert weight; our shared experts are renamed while it saves.
_DS_RENAMES = {"shared_experts.": "shared_mlp.", "shared_expert_gate.": "shared_gate."}


class DeepSpeedMoE(MoE, _DeepSpeedNativeMoE):
    """A moe.MoE that DeepSpeed's engine treats as one of its MoE layers. Made by prepare().

    Our forward (a tensor, not DeepSpeed's (output, l_aux, counts) tuple), our parameters and our
    state_dict names; plus the attributes the engine reads (num_experts, ep_size,
    num_local_experts, expert_group_name, ...) and set_deepspeed_parallelism(), which the engine
    calls during deepspeed.initialize.
    """

    num_experts: int
    ep_size: int
    num_local_experts: int
    expert_group_name: str
    enable_expert_tensor_parallelism: bool
    use_residual: bool
    _ds_data_before_expert: bool
    _ds_checkpoint_names: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("build moe.MoE layers and call moe.integrations.deepspeed.prepare(model, ep_size=...)")

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: checks that our expert group is the one DeepSpeed will reduce over."""
        if bool(use_data_before_expert_parallel_) != self._ds_data_before_expert:
            raise ValueError(
                f"the DeepSpeed config has use_data_before_expert_parallel_={use_data_before_expert_parallel_} but "
                f"prepare() built the expert groups with data_before_expert={self._ds_data_before_expert}; pass "
                f"prepare(..., data_before_expert={bool(use_data_before_expert_parallel_)})"
            )
        if self.expert_group_name not in _groups._get_expert_parallel_group_dict():
            raise ValueError(
                f"DeepSpeed has no expert group {self.expert_group_name!r}: call prepare() after "
                "deepspeed.init_distributed() and in the same process as deepspeed.initialize()"
            )
        if self.parallel is not None:
            want = dist.get_process_group_ranks(_groups._get_expert_parallel_group(self.expert_group_name))
            have = dist.get_process_group_ranks(self.parallel.group)
            if want != have:
                raise ValueError(f"layer's expert group has ranks {have}, DeepSpeed's {self.expert_group_name} {want}")

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """moe.MoE.forward: x [..., D] -> [..., D] (DeepSpeed's own MoE returns a tuple; ours does not)."""
        return MoE.forward(self, x, token_mask)

    def extra_repr(self) -> str:
        return f"{MoE.extra_repr(self)}, ep_size={self.ep_size}"


def _layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _expert_params(layer: MoE) -> list[nn.Parameter]:
    return [layer.experts.w_in, layer.experts.w_out]


def _ensure_distributed() -> None:
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()


def _expert_groups(ep_size: int, data_before_expert: bool) -> Any:
    """DeepSpeed's expert-parallel group for ep_size (created on first use, like its own MoE layers)."""
    name = f"ep_size_{ep_size}"
    if name not in _groups._get_expert_parallel_group_dict():
        _groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=data_before_expert)
    return _groups._get_expert_parallel_group(name)


def prepare(
    model: nn.Module,
    ep_size: int = 1,
    *,
    plan: Any = None,
    planner_config: Any = None,
    data_before_expert: bool = False,
    sync_weights: bool = True,
) -> nn.Module:
    """Makes every moe.MoE in model trainable by the DeepSpeed engine, in place (collective).

    Call on every rank, after building the model and before deepspeed.initialize. With
    ep_size > 1 each layer keeps only the experts of its rank in DeepSpeed's "ep_size_<n>"
    group (ranks of one group hold different experts; groups repeat over the data-parallel
    dimension); ep_size = 1 keeps all experts on every rank (plain data parallel).

    Args:
        model: a module containing moe.MoE layers built without process_group.
        ep_size: expert-parallel size: divides both the world size and every layer's num_experts.
        plan: pinned moe.parallel plan for the all-to-all (None = adaptive planner), e.g. "ep".
        planner_config: moe.parallel.PlannerConfig.
        data_before_expert: must equal the config's use_data_before_expert_parallel_.
        sync_weights: broadcast every layer's full experts from rank 0 before sharding, so the
            sharded model is exactly rank 0's model (DeepSpeed broadcasts the other weights).

    Returns:
        model (the same object).

    Raises:
        ValueError: no moe.MoE layers, a bad ep_size, layers already expert-parallel, names
            DeepSpeed's checkpoint code would misread, or ZeRO-3-partitioned parameters.
    """
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moe.MoE layers; nothing to prepare for DeepSpeed")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    _ensure_distributed()
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    for name, layer in layers:
        _check_preparable(name, layer, ep_size)
    group = _expert_groups(ep_size, data_before_expert)
    group_name = f"ep_size_{ep_size}"
    for _, layer in layers:
        if isinstance(layer, DeepSpeedMoE):
            continue
        if ep_size > 1:
            _shard(layer, group, plan, planner_config, sync_weights)
        _mark(layer, ep_size, group_name, data_before_expert)
    return model


def _check_preparable(name: str, layer: MoE, ep_size: int) -> None:
    where = name or "the model"
    if isinstance(layer, DeepSpeedMoE):
        if layer.ep_size != ep_size:
            raise ValueError(f"{where} was prepared with ep_size={layer.ep_size}, now ep_size={ep_size}")
        return
    if layer.parallel is not None:
        raise ValueError(
            f"{where} was built with process_group=...; build it without one and let prepare() shard it "
            "over DeepSpeed's expert-parallel group"
        )
    if layer.config.num_experts % ep_size:
        raise ValueError(f"{where}: num_experts ({layer.config.num_experts}) must be divisible by ep_size ({ep_size})")
    if "expert" in name:
        raise ValueError(
            f"MoE layer path {name!r} contains 'expert': DeepSpeed's checkpoint code would treat all of its "
            "weights as expert weights; rename the attribute (e.g. .moe or .mlp)"
        )
    if not name:
        raise ValueError(
            "the model itself is a moe.MoE layer: DeepSpeed's checkpoint keys would start with '.', which do not "
            "load back; wrap it in a module (e.g. nn.Sequential(layer)) before prepare()"
        )
    renamed = tuple(_DS_RENAMES)  # shared experts are renamed for DeepSpeed's checkpoints
    odd = [
        k
        for k in layer.state_dict()
        if "expert" in k and k not in ("experts.w_in", "experts.w_out") and not k.startswith(renamed)
    ]
    if odd:
        raise ValueError(
            f"{where} has state {odd[:3]} whose names contain 'expert': DeepSpeed's checkpoint code would take "
            "them for expert weights and fail to save; rename them (e.g. in a custom router)"
        )
    if any(hasattr(p, "ds_id") for p in layer.parameters()):
        raise ValueError(
            f"{where} has ZeRO-3-partitioned parameters (built under deepspeed.zero.Init); expert-parallel "
            "MoE layers work with ZeRO stage 0, 1 or 2"
        )


@torch.no_grad()
def _shard(layer: MoE, group: Any, plan: Any, planner_config: Any, sync_weights: bool) -> None:
    from moe.parallel import ExpertParallel

    full = layer.experts
    w_in, w_out = full.w_in.detach(), full.w_out.detach()
    if sync_weights:
        device = collective_device()
        w_in, w_out = w_in.to(device, copy=True), w_out.to(device, copy=True)
        dist.broadcast(w_in, src=0)
        dist.broadcast(w_out, src=0)
        w_in, w_out = w_in.to(full.w_in.device), w_out.to(full.w_out.device)
    parallel = ExpertParallel(layer.config, group, plan, planner_config)
    parallel.experts.to(device=w_in.device, dtype=w_in.dtype)
    parallel.experts.load_global(w_in, w_out)
    parallel.experts.w_in.requires_grad_(full.w_in.requires_grad)
    parallel.experts.w_out.requires_grad_(full.w_out.requires_grad)
    layer.parallel = parallel
    layer.config = dataclasses.replace(layer.config, parallel=ParallelConfig(plan=plan, planner=planner_config))
    layer.experts = parallel.experts  # type: ignore[assignment]
    layer.dispatcher = parallel.dispatcher


def _mark(layer: MoE, ep_size: int, group_name: str, data_before_expert: bool) -> None:
    cls: Any = type(layer)
    layer.__class__ = _marked_class(cls)
    ds = layer
    assert isinstance(ds, DeepSpeedMoE)
    ds.num_experts = layer.config.num_experts
    ds.ep_size = ep_size
    ds.num_local_experts = layer.config.num_experts // ep_size
    ds.expert_group_name = group_name
    ds.enable_expert_tensor_parallelism = False
    ds.use_residual = layer.config.residual
    ds._ds_data_before_expert = data_before_expert
    ds._ds_checkpoint_names = False
    for p in _expert_params(layer):
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = group_name  # type: ignore[attr-defined]
    layer.register_state_dict_post_hook(_to_deepspeed_names)
    layer.register_load_state_dict_pre_hook(_from_deepspeed_names)


@functools.cache
def _marked_class(cls: Any) -> type:
    if issubclass(cls, DeepSpeedMoE):
        return cls
    if cls is MoE:
        return DeepSpeedMoE
    return type(f"DeepSpeed{cls.__name__}", (cls, DeepSpeedMoE), {"__init__": DeepSpeedMoE.__init__})


def _to_deepspeed_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """While the engine saves: experts as DeepSpeed's per-local-expert keys, shared experts renamed."""
    if not getattr(module, "_ds_checkpoint_names", False):
        return
    for w in ("w_in", "w_out"):
        fused = state_dict.pop(f"{prefix}experts.{w}")
        for i in range(fused.shape[0]):
            state_dict[f"{prefix}{DS_EXPERTS}.{i}.{w}"] = fused[i]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in _DS_RENAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)


def _from_deepspeed_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Accepts both our names and the ones _to_deepspeed_names writes (what the engine loads)."""
    for w in ("w_in", "w_out"):
        keys = sorted(
            (k for k in state_dict if k.startswith(f"{prefix}{DS_EXPERTS}.") and k.endswith(f".{w}")),
            key=lambda k: int(k[len(f"{prefix}{DS_EXPERTS}.") :].split(".")[0]),
        )
        if keys:
            state_dict[f"{prefix}experts.{w}"] = torch.stack([state_dict.pop(k) for k in keys])
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in _DS_RENAMES.items():
            if rest.startswith(new):
                state_dict[prefix + old + rest[len(new) :]] = state_dict.pop(key)


@contextlib.contextmanager
def deepspeed_checkpoint_names(model: nn.Module) -> Iterator[None]:
    """Within: prepared layers' state_dict uses the names DeepSpeed's MoE checkpoint code expects."""
    layers = [m for _, m in _layers(model) if isinstance(m, DeepSpeedMoE)]
    for m in layers:
        m._ds_checkpoint_names = True
    try:
        yield
    finally:
        for m in layers:
            m._ds_checkpoint_names = False


def check(engine: Any) -> Any:
    """The guard to run after deepspeed.initialize (collective); also enables engine checkpoints.

    Verifies that the engine found our MoE layers, that every expert parameter is marked for
    expert-data-parallel reduction in a group the engine knows, and that the ranks of each
    expert-parallel group hold different experts. Then wraps engine.save_checkpoint /
    load_checkpoint so they store our experts by global expert id.

    Raises:
        ValueError: unprepared layers, an engine that did not see them, ZeRO stage 3, or
            experts merged across expert-parallel ranks.

    Returns:
        engine.
    """
    model = engine.module
    layers = _layers(model)
    if not layers:
        raise ValueError("engine.module has no moe.MoE layers; nothing for the DeepSpeed MoE plugin to check")
    fix = "call moe.integrations.deepspeed.prepare(model, ep_size=...) before deepspeed.initialize"
    for name, layer in layers:
        if not isinstance(layer, DeepSpeedMoE):
            raise ValueError(
                f"{name or 'the model'} is a moe.MoE that was not prepared for DeepSpeed: the engine treats "
                f"its experts as ordinary data-parallel weights; {fix}"
            )
    if not getattr(engine, "has_moe_layers", False):
        raise ValueError(f"the DeepSpeed engine did not register the MoE layers; {fix}")
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise ValueError(_zero3_message(stage))
    for name, layer in layers:
        assert isinstance(layer, DeepSpeedMoE)
        if layer.expert_group_name not in engine.expert_data_parallel_group:
            raise ValueError(f"{name}: the engine has no expert-data-parallel group {layer.expert_group_name!r}; {fix}")
        for p in _expert_params(layer):
            if getattr(p, "allreduce", True) or getattr(p, "group_name", None) != layer.expert_group_name:
                raise ValueError(f"{name}: expert parameters lost their DeepSpeed marks; {fix}")
        if layer.ep_size > 1:
            _check_distinct(name, layer)
    _wrap_checkpointing(engine)
    return engine


def _zero3_message(stage: int) -> str:
    return (
        f"ZeRO stage {stage} is not supported with moe.MoE layers under DeepSpeed: stage 3 partitions every "
        "parameter over all ranks, while expert parallelism keeps each expert whole on its EP rank. Use ZeRO "
        "stage 1 or 2 (optimizer states / gradients sharded, experts sharded by expert parallelism: "
        "zero_optimization.stage = 2) or stage 0"
    )


@torch.no_grad()
def _check_distinct(name: str, layer: DeepSpeedMoE) -> None:
    assert layer.parallel is not None
    group = layer.parallel.group
    experts: Any = layer.experts
    stored = experts.stored
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    w = torch.cat([w_in.double().flatten(), w_out.double().flatten()])
    # Whether this rank's experts are copies of one another (upcycling; DeepSpeed's own MoE
    # deep-copies one expert): then equal ranks are expected, not a sign of a merge.
    alike = bool((w_in == w_in[:1]).all() and (w_out == w_out[:1]).all()) if w_in.shape[0] > 1 else None
    values = [float(stored.first_expert), float(stored.num_experts), float(w.sum()), float((w * w).sum())]
    values.append(-1.0 if alike is None else float(alike))
    mine = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    world = dist.get_world_size(group)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    firsts = sorted(int(t[0]) for t in everyone)
    if firsts != [r * layer.num_local_experts for r in range(world)]:
        raise ValueError(f"{name}: expert-parallel ranks hold experts starting at {firsts}, not a partition")
    fingerprints = {(float(t[2]), float(t[3])) for t in everyone}
    if len(fingerprints) == world or not all(float(t[3]) > 0 for t in everyone):  # all-zero experts are alike
        return
    if all(float(t[4]) == 0.0 for t in everyone):  # experts differ within each rank, yet ranks are equal
        raise ValueError(
            f"{name}: ranks of the expert-parallel group {layer.expert_group_name} hold identical expert weights, "
            "so experts were merged (e.g. broadcast as ordinary data-parallel weights); prepare the model before "
            "deepspeed.initialize and do not copy expert weights across ranks"
        )
    if any(float(t[4]) < 0 for t in everyone):  # one expert per rank: cannot tell a merge from upcycling
        warnings.warn(
            f"{name}: ranks of the expert-parallel group {layer.expert_group_name} hold identical expert weights. "
            "Fine if the experts start identical (upcycling); if not, experts were merged (e.g. broadcast as "
            "ordinary data-parallel weights): prepare the model before deepspeed.initialize and do not copy "
            "expert weights across ranks",
            stacklevel=3,
        )


def _wrap_checkpointing(engine: Any) -> None:
    if getattr(engine, "_moe_checkpointing", False):
        return
    engine.save_checkpoint = _with_names(engine.module, engine.save_checkpoint)
    engine.load_checkpoint = _with_names(engine.module, engine.load_checkpoint)
    engine._moe_checkpointing = True


def _with_names(model: nn.Module, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with deepspeed_checkpoint_names(model):
            return method(*args, **kwargs)

    return call


def initialize(
    model: nn.Module,
    config: dict[str, Any] | str,
    ep_size: int = 1,
    *,
    model_parameters: Any = None,
    plan: Any = None,
    planner_config: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """prepare(model, ep_size) -> deepspeed.initialize(...) -> check(engine), with a ZeRO-3 check first.

    Args:
        model: a module with moe.MoE layers.
        config: DeepSpeed config dict or path to its JSON.
        ep_size: expert-parallel size (see prepare).
        model_parameters: what deepspeed.initialize optimizes (default: list(model.parameters())
            after preparing, which the engine splits into MoE and dense groups).
        plan, planner_config: see prepare.
        **kwargs: passed on to deepspeed.initialize (optimizer, lr_scheduler, ...).

    Returns:
        deepspeed.initialize's (engine, optimizer, dataloader, lr_scheduler).
    """
    cfg = _read_config(config)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        raise ValueError(_zero3_message(stage))
    _ensure_distributed()
    prepare(
        model,
        ep_size,
        plan=plan,
        planner_config=planner_config,
        data_before_expert=bool(cfg.get("use_data_before_expert_parallelism", False)),
    )
    params = list(model.parameters()) if model_parameters is None else model_parameters
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        model=model, config=cfg, model_parameters=params, **kwargs
    )
    check(engine)
    return engine, optimizer, loader, scheduler


def _read_config(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    import json

    with open(config) as f:
        return dict(json.load(f))


def export_safetensors(model: Any, path: str | os.PathLike) -> None:
    """Writes the model (an engine or its module) to one safetensors file, experts by global id.

    Collective with expert parallelism (every rank calls it; rank 0 writes). The file loads
    with load_safetensors() at any EP size, or with moe.parallel.load_checkpoint into a model
    that never saw DeepSpeed.
    """
    from moe.parallel import save_checkpoint

    save_checkpoint(getattr(model, "module", model), path)


def load_safetensors(model: Any, path: str | os.PathLike, strict: bool = True) -> None:
    """Loads an export_safetensors / moe.parallel.save_checkpoint file at this model's EP size.

    Given an engine whose ZeRO optimizer keeps fp32 master copies, those are refreshed too.
    """
    from moe.parallel import load_checkpoint

    load_checkpoint(getattr(model, "module", model), path, strict=strict)
    refresh = getattr(getattr(model, "optimizer", None), "refresh_fp32_params", None)
    if callable(refresh):
        refresh()


def skip_cpu_comm_build() -> None:
    """Stops DeepSpeed from JIT-compiling its shared-memory CPU all-reduce op (~2 min, once per machine).

    That op only speeds up CPU all-reduce; torch.distributed (gloo) does the same work. Call it
    before deepspeed.init_distributed / deepspeed.initialize on CPU-only runs (tests, CI).
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


__all__ = [
    "DeepSpeedMoE",
    "prepare",
    "initialize",
    "check",
    "deepspeed_checkpoint_names",
    "export_safetensors",
    "load_safetensors",
    "skip_cpu_comm_build",
]
