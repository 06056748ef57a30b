"""moe.offload.load: a transformers MoE checkpoint with attention/embeddings on the device and
routed experts in a tiered store (never all resident).

Steps: validate the shards (headers and sizes); build the HF model from config.json with every
parameter on the meta device (buffers such as rotary tables are real); patch() its sparse MoE
blocks into moe.MoE layers (still meta); swap each layer's experts for OffloadedExperts; load
every non-expert tensor from the memory-mapped shards onto the device. GPT-OSS's per-expert
biases are read from the shards too and stay on the device (tiny next to the weights). Only safetensors and JSON
are read: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe.offload.checkpoint import (
    MXFP4_SUFFIXES,
    CheckpointError,
    ExpertIndex,
    ShardReader,
    index_experts,
    shard_files,
)
from moe.offload.runtime import OffloadConfig, OffloadedExperts, OffloadRuntime
from moe.offload.store import ExpertShape, ExpertStore, Reader

__all__ = ["OffloadedModel", "load"]


@dataclass
class OffloadedModel:
    """What load() returns: the transformers model (generate() works) and the offload runtime."""

    model: nn.Module
    runtime: OffloadRuntime
    model_dir: str
    shards: ShardReader | None = None  # the store's reader of the checkpoint's shard files

    def close(self) -> None:
        """Stops the store's reader thread, then closes the checkpoint's shard files (their memory
        maps); the model cannot run experts after it."""
        self.runtime.close()
        if self.shards is not None:
            self.shards.close()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside goes to the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _layer_number(name: str) -> int:
    parts = name.split(".")
    for prev, part in zip(parts, parts[1:], strict=False):
        if prev == "layers" and part.isdigit():
            return int(part)
    raise CheckpointError(f"cannot find a layer number in module name {name!r}")


def _block_renames(block_name: str, spec: Any) -> dict[str, str]:
    """HF parameter names inside a sparse MoE block -> names inside our HFMoEBlock wrapper."""
    router = spec.router_attr
    out = {
        f"{router}.weight": "moe.router.weight",
        f"{router}.e_score_correction_bias": "moe.router.e_score_correction_bias",
        f"{router}.bias": "moe.router.bias",  # GPT-OSS
        "e_score_correction_bias": "moe.router.e_score_correction_bias",  # MiniMax-M2: on the block
        "gate.moe_statics.e_score_correction_bias": "moe.router.e_score_correction_bias",  # ERNIE 4.5 ([1, E])
        # On-disk router names that transformers 5.x renames on load: PhiMoE's gate, Granite's router.layer.
        "gate.weight": "moe.router.weight",
        "router.layer.weight": "moe.router.weight",
    }
    if spec.shared_expert:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{spec.shared_expert}.{proj}.weight"] = f"moe.shared_experts.{proj}.weight"
    if spec.shared_expert_gate:
        out[f"{spec.shared_expert_gate}.weight"] = "moe.shared_expert_gate.weight"
    return out


def _hf_renaming(model_type: str) -> Callable[[str], str]:
    """transformers' own load-time renames of checkpoint names for `model_type` (plain renames only,
    e.g. MiniCPM5-MoE's self_attn.q_proj -> q_gate_proj); the identity where there are none or
    this transformers has no such table."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # transformers 4.x: no conversion table
        return lambda name: name
    renamings = [t for t in get_checkpoint_conversion_mapping(model_type) or [] if isinstance(t, WeightRenaming)]
    return lambda name: apply_renamings(name, renamings) if renamings else name


def _map_names(
    idx: ExpertIndex,
    blocks: dict[int, tuple[str, Any]],
    model_keys: set[str],
    rename: Callable[[str], str] = lambda name: name,
) -> dict[str, str]:
    """Checkpoint name -> model state_dict name, for every non-expert tensor."""
    mapping: dict[str, str] = {}
    unknown = []
    for name in idx.others:
        renamed = rename(name)  # transformers' own load-time renames (e.g. MiniCPM5's q_gate_proj)
        target = name if name in model_keys else renamed if renamed in model_keys else None
        for layer, (block_name, spec) in blocks.items():
            prefix = idx.prefixes.get(layer, block_name)
            if name.startswith(prefix + "."):
                inner = _block_renames(block_name, spec).get(name[len(prefix) + 1 :])
                if inner is None and renamed.startswith(block_name + "."):  # e.g. ERNIE's moe_statics
                    inner = _block_renames(block_name, spec).get(renamed[len(block_name) + 1 :])
                target = f"{block_name}.{inner}" if inner is not None else None
                break
        if target is None or target not in model_keys:
            unknown.append(name)
        else:
            mapping[name] = target
    if unknown:
        raise CheckpointError(
            f"config does not match weights: the checkpoint has {len(unknown)} tensors the model built from "
            f"config.json has no place for, e.g. {sorted(unknown)[:4]}"
        )
    return mapping


def _check_experts(idx: ExpertIndex, reader: ShardReader, layers: list[tuple[int, Any]]) -> None:
    moe_layers = {number for number, _ in layers}
    extra = sorted({layer for layer, _ in idx.experts} - moe_layers)
    if extra:
        raise CheckpointError(
            f"config does not match weights: experts in checkpoint layers {extra}, which config.json makes dense"
        )
    for number, moe_layer in layers:
        cfg = moe_layer.config
        have = sorted(e for layer, e in idx.experts if layer == number)
        if have != list(range(cfg.num_experts)):
            raise CheckpointError(
                f"config does not match weights: layer {number} has experts {have[:3]}..{have[-3:] if have else []} "
                f"({len(have)}) in the checkpoint, config.json says {cfg.num_experts}"
            )
        for e in range(cfg.num_experts):  # headers only: every expert, so none fails mid-generation
            d, i = reader.expert_shapes(idx.experts[(number, e)])
            if (d, i) != (cfg.dim, cfg.hidden_dim):
                raise CheckpointError(
                    f"config does not match weights: layer {number} expert {e} is [dim={d}, hidden={i}] in the "
                    f"checkpoint, config.json says [dim={cfg.dim}, hidden={cfg.hidden_dim}]"
                )


DEFAULT_EXPERT_CACHE_BYTES = 1 << 30


def load(
    model_dir: str,
    device: str | torch.device = "cpu",
    expert_cache_bytes: int | None = None,
    policy: str | None = None,
    *,
    config: OffloadConfig | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    scope: str | None = None,
    lookahead: int | None = None,
    miss: str | None = None,
    ram_cache_bytes: int | None = None,
    record_trace: bool | None = None,
    expert_quant: str | None = None,
) -> OffloadedModel:
    """Loads a transformers MoE model directory with its routed experts offloaded.

        om = moe.offload.load(dir, "cuda", config=OffloadConfig(expert_cache_bytes=4 << 30, policy="lfu"))

    Args:
        model_dir: directory with config.json and *.safetensors (+ index) as save_pretrained writes.
        device: where attention, embeddings, routers, shared experts and the expert cache live.
        config: how experts are cached (OffloadConfig; None = OffloadConfig(expert_cache_bytes=1 GiB)).
            With scope="layer" the budget is split evenly over MoE layers; each layer needs
            room for at least one expert.
        dtype: compute dtype (default: config.json's dtype, else float32).
        progress: show a tqdm bar while loading.
        expert_quant: "int8" | "int4": quantize the routed experts (sets config.expert_quant;
            the other quantization settings are OffloadConfig's expert_quant_*).
        expert_cache_bytes, policy, scope, lookahead, miss, ram_cache_bytes, record_trace:
            deprecated (DeprecationWarning): the fields of OffloadConfig, pass config= instead.

    Returns:
        OffloadedModel(model, runtime, model_dir); model.generate(...) works as usual.

    Raises:
        CheckpointError (a ValueError): missing/truncated shard, no safetensors, or a config that
            does not match the weights.
        ValueError: an unknown expert_quant, an int4 group size that does not divide the model dim
            or the expert hidden size, an expert_quant_dir cache of other settings or whose scales
            do not match.
        BudgetError (a ValueError): expert_cache_bytes cannot hold one expert per layer.
        TypeError: the model has no supported sparse MoE block.
    """
    oconfig = _offload_config(
        config,
        dict(
            expert_cache_bytes=expert_cache_bytes,
            policy=policy,
            scope=scope,
            lookahead=lookahead,
            miss=miss,
            ram_cache_bytes=ram_cache_bytes,
            record_trace=record_trace,
        ),
    )
    if expert_quant is not None and expert_quant != oconfig.expert_quant:
        if config is not None and config.expert_quant is not None:
            raise TypeError(
                f"expert_quant={expert_quant!r} contradicts config.expert_quant={config.expert_quant!r}; give one"
            )
        oconfig = dataclasses.replace(oconfig, expert_quant=expert_quant)  # type: ignore[arg-type]
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe.integrations.hf_families import SUPPORTED_BLOCKS, bias_holder, spec_for
    from moe.integrations.transformers import patch

    device = torch.device(device)
    names = shard_files(model_dir)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir!r} has no config.json")
    config = AutoConfig.from_pretrained(model_dir)
    if dtype is None:
        cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) else torch.float32
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    blocks = {
        _layer_number(n): (n, spec_for(m)) for n, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS
    }
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no supported sparse MoE block ({', '.join(SUPPORTED_BLOCKS)})")
    for name, _ in blocks.values():  # block buffers (e.g. DeepSeek's bias) come from the checkpoint
        for sub in model.get_submodule(name).modules():
            for bname, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[bname] = buf.to("meta")
    patch(model)
    layers = sorted((number, model.get_submodule(name).moe) for number, (name, _) in blocks.items())
    activation = _activation(model, layers)
    if activation == "swiglu_oai" and (oconfig.expert_quant is not None or oconfig.miss_quant is not None):
        raise ValueError(
            f"expert_quant={oconfig.expert_quant!r} / miss_quant={oconfig.miss_quant!r}: GPT-OSS's experts "
            "(biases, clamped SwiGLU) are not supported quantized yet (the quantized expert MLP has neither); "
            "offload them unquantized (expert_quant=None, miss_quant=None)"
        )
    mxfp4 = sorted(n for n in names if ".experts." in n and n.endswith(MXFP4_SUFFIXES))
    if mxfp4:
        raise CheckpointError(
            f"{model_dir!r} holds MXFP4-quantized experts (e.g. {mxfp4[0]}), which moe.offload does not read; "
            "save a dequantized copy first: from_pretrained(dir, quantization_config=Mxfp4Config(dequantize=True)) "
            "then save_pretrained"
        )

    idx = index_experts(names, layout="gpt_oss" if activation == "swiglu_oai" else "hf")
    checker = ShardReader()
    _check_experts(idx, checker, layers)
    shapes = {
        o: ExpertShape(m.config.dim, m.config.hidden_dim, 2 * m.config.hidden_dim) for o, (_, m) in enumerate(layers)
    }
    numbers = [number for number, _ in layers]
    shard_reader = ShardReader()  # used on the store's worker thread only

    def read(key: tuple[int, int], out_flat: torch.Tensor) -> None:
        shape = shapes[key[0]]
        shard_reader.read_expert(idx.experts[(numbers[key[0]], key[1])], out_flat, shape.dim, shape.hidden)

    store_shapes, store_dtype, store_read = _expert_format(oconfig, shapes, read, dtype, layers)
    store = ExpertStore(store_read, store_shapes, store_dtype, device, oconfig.ram_cache_bytes)
    first = layers[0][1].experts
    try:
        runtime = OffloadRuntime(
            store,
            oconfig,
            [m.router for _, m in layers],
            [m.config.num_experts for _, m in layers],
            activation,
            swiglu_alpha=first.alpha,
            swiglu_limit=first.limit,
        )
    except Exception:
        store.close()
        raise
    for ordinal, (number, moe_layer) in enumerate(layers):
        c = moe_layer.config
        b_in, b_out = _expert_biases(idx, checker, number, c.num_experts, dtype, device)
        moe_layer.experts = OffloadedExperts(
            runtime, ordinal, c.num_experts, c.dim, c.hidden_dim, dtype, device, b_in, b_out
        )

    for name, spec in blocks.values():  # DeepSeek-V2's HF router has no bias: ours is a fixed zero
        wrapper = model.get_submodule(name)
        router = wrapper.moe.router
        hf_bias = hasattr(bias_holder(wrapper._hf_skeleton, spec), "e_score_correction_bias")
        if isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor) and not hf_bias:
            router.e_score_correction_bias = torch.zeros(router.e_score_correction_bias.shape, device=device)
    _load_dense(model, idx, blocks, checker, dtype, device, progress)
    model.eval()
    return OffloadedModel(model, runtime, model_dir, shard_reader)


def _expert_format(
    oconfig: OffloadConfig, shapes: dict[int, ExpertShape], read: Reader, dtype: torch.dtype, layers: list[Any]
) -> tuple[dict[int, ExpertShape], torch.dtype, Reader]:
    """(shapes, dtype, reader) of the store's buffers: the checkpoint's experts in `dtype`, or
    quantized (oconfig.expert_quant) into uint8 buffers by moe.offload.quantized."""
    if oconfig.expert_quant is None:
        return shapes, dtype, read
    from moe.offload.quantized import QuantizedExpertShape, cached_reader, quantizing_reader

    qshapes = {
        o: QuantizedExpertShape(
            s.dim,
            s.hidden,
            s.width,
            scheme=oconfig.expert_quant,
            group_size=oconfig.expert_quant_group_size,
            weight_dtype=dtype,
        )
        for o, s in shapes.items()
    }
    if oconfig.expert_quant_dir is None:
        qread = quantizing_reader(read, qshapes, dtype)
    else:
        num_experts = [m.config.num_experts for _, m in layers]
        qread = cached_reader(oconfig.expert_quant_dir, read, qshapes, num_experts, dtype)
    return dict(qshapes), torch.uint8, qread


def _activation(model: nn.Module, layers: list[tuple[int, Any]]) -> str:
    """The one expert activation of all MoE layers ("swiglu", or "swiglu_oai" for GPT-OSS)."""
    found = {(m.config.activation, m.config.expert_bias) for _, m in layers}
    if found == {("swiglu", False)} or found == {("swiglu_oai", True)}:
        return next(iter(found))[0]
    raise TypeError(
        f"offload: {type(model).__name__}'s experts (activation, expert_bias) = {sorted(found)} are not "
        "supported offloaded; OffloadedExperts run bias-free SwiGLU or GPT-OSS's biased clamped SwiGLU"
    )


def _expert_biases(
    idx: ExpertIndex, reader: ShardReader, number: int, num_experts: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(b_in [E, 2I], b_out [E, D]) of model layer `number` on the device (GPT-OSS), or (None, None)."""
    rows = [reader.read_expert_bias(idx.experts[(number, e)]) for e in range(num_experts)]
    if all(r is None for r in rows):
        return None, None
    if any(r is None for r in rows):
        raise CheckpointError(f"config does not match weights: layer {number} has biases for some experts only")
    b_in = torch.stack([r[0] for r in rows if r is not None]).to(device=device, dtype=dtype)
    b_out = torch.stack([r[1] for r in rows if r is not None]).to(device=device, dtype=dtype)
    return b_in, b_out


def _offload_config(config: OffloadConfig | None, loose: dict[str, Any]) -> OffloadConfig:
    """config, or one built from the deprecated loose keywords (None = not given)."""
    given = {k: v for k, v in loose.items() if v is not None}
    if config is not None:
        if not isinstance(config, OffloadConfig):
            raise TypeError(f"config must be a moe.offload.OffloadConfig, got {type(config).__name__}")
        if given:
            raise TypeError(
                f"pass the cache settings either as config=OffloadConfig(...) or as keywords {sorted(given)}, not both"
            )
        return config
    if given:
        warnings.warn(
            f"moe.offload.load(..., {', '.join(f'{k}=' for k in given)}) is deprecated; pass "
            f"config=moe.offload.OffloadConfig({', '.join(f'{k}=...' for k in given)})",
            DeprecationWarning,
            stacklevel=3,
        )
    given.setdefault("expert_cache_bytes", DEFAULT_EXPERT_CACHE_BYTES)
    return OffloadConfig(**given)


def _load_dense(
    model: nn.Module,
    idx: ExpertIndex,
    blocks: dict[int, tuple[str, Any]],
    reader: ShardReader,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> None:
    """Loads every non-expert tensor onto the device and checks nothing stays on meta."""
    model_keys = set(model.state_dict().keys())
    mapping = _map_names(idx, blocks, model_keys, _hf_renaming(str(getattr(model.config, "model_type", ""))))
    items = sorted(mapping.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="loading (experts stay offloaded)", unit="tensor")
    state = {}
    current = model.state_dict()
    for ckpt_name, model_name in items:
        value = reader.tensor((idx.others[ckpt_name], ckpt_name))
        want = current[model_name]
        if model_name.endswith("e_score_correction_bias") and value.numel() == want.numel():
            value = value.reshape(want.shape)  # ERNIE 4.5 keeps it as [1, E]
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"config does not match weights: {ckpt_name} is {tuple(value.shape)} in the checkpoint, "
                f"the model built from config.json expects {tuple(want.shape)}"
            )
        keep_fp32 = model_name.endswith("e_score_correction_bias") or not value.is_floating_point()
        state[model_name] = value.to(device=device, dtype=value.dtype if keep_fp32 else dtype)
    model.load_state_dict(state, strict=False, assign=True)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if out_emb is not None and out_emb.weight.is_meta and getattr(model.config, "tie_word_embeddings", False):
        out_emb.weight = in_emb.weight
    for module_name, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                if bname in module._non_persistent_buffers_set:
                    module._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                    continue
                raise CheckpointError(f"config does not match weights: checkpoint lacks buffer {module_name}.{bname}")
            module._buffers[bname] = buf.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(
            f"config does not match weights: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}"
        )
