"""A transformers model directory's safetensors shards: validation, key index, one-expert reads.

Only safetensors is read (memory-mapped through safetensors.safe_open); nothing is unpickled.

Shape legend: E experts, D model dim, I expert hidden dim (HF "intermediate"), F = 2I.
Expert layouts understood (HF names; both become our coalesced buffer [w_in D x F | w_out I x D]):
    per expert: <prefix>.experts.<e>.(w1|gate_proj).weight [I, D], (w3|up_proj) [I, D], (w2|down_proj) [D, I]
    fused:      <prefix>.experts.gate_up_proj [E, 2I, D] (rows [:I] gate), <prefix>.experts.down_proj [E, D, I]
    Granite:    <prefix>.input_linear.weight [E, 2I, D] (rows [:I] gate), <prefix>.output_linear.weight [E, D, I]
                (the names GraniteMoe checkpoints keep on disk; 5.x renames them to experts.* on load)
    GPT-OSS:    <prefix>.experts.gate_up_proj [E, D, 2I] (x @ W, gate/up interleaved: even columns gate),
                <prefix>.experts.down_proj [E, I, D], and per-expert biases gate_up_proj_bias [E, 2I]
                (interleaved), down_proj_bias [E, D]; read with layout="gpt_oss" (index_experts).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.integrations.hf_families import deinterleave

__all__ = [
    "CheckpointError",
    "ExpertIndex",
    "ExpertLocation",
    "ShardReader",
    "index_experts",
    "read_header",
    "shard_files",
]

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.[A-Za-z_]+)\.experts\.(?P<e>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.[A-Za-z_]+)\."
    r"(?:experts\.(?P<proj>gate_up_proj|down_proj)|(?P<granite>input_linear|output_linear)\.weight)$"
)
_FUSED_BIAS = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.[A-Za-z_]+)\.experts\.(?P<proj>gate_up_proj_bias|down_proj_bias)$"
)
# GPT-OSS's MXFP4 expert tensors (as on the hub): not read, refused with a message (loader).
MXFP4_SUFFIXES = ("_blocks", "_scales")
LAYOUTS = ("hf", "gpt_oss")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class CheckpointError(ValueError):
    """The model directory is incomplete, truncated or does not match its config."""


def shard_files(model_dir: str) -> dict[str, str]:
    """tensor name -> shard path, from model.safetensors.index.json or the *.safetensors files.

    Raises:
        CheckpointError: no safetensors (e.g. only pytorch_model.bin, which we never unpickle),
            a shard named by the index is missing, or a shard is truncated.
    """
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not files:
            raise CheckpointError(
                f"no *.safetensors in {model_dir!r}; moe.offload reads safetensors only (never pickle "
                "checkpoints such as pytorch_model.bin): convert with model.save_pretrained(dir)"
            )
        weight_map = {}
    names: dict[str, str] = {}
    for name in files:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            raise CheckpointError(
                f"shard {name!r} listed in model.safetensors.index.json is missing from {model_dir!r}"
            )
        for key in read_header(path):
            names[key] = path
    missing = sorted(k for k, v in weight_map.items() if k not in names)
    if missing:
        raise CheckpointError(f"index lists tensors no shard holds, e.g. {missing[:3]}: the shards are incomplete")
    return names


def read_header(path: str) -> dict[str, Any]:
    """The safetensors header of `path` (tensor name -> dtype/shape/offsets), checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"shard {path!r} is truncated ({size} bytes): re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"shard {path!r} is truncated (header of {n} bytes, file {size} bytes)")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"shard {path!r} has a corrupt header: {exc}") from exc
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"shard {path!r} is truncated: its tensors need {8 + n + end} bytes, the file has {size}; "
            "re-download or re-save it"
        )
    return header


@dataclass
class ExpertLocation:
    """Where one expert's three projections live: per-expert keys, or a row of fused tensors."""

    gate: tuple[str, str] | None = None  # (path, key) of gate [I, D]
    up: tuple[str, str] | None = None
    down: tuple[str, str] | None = None  # [D, I]
    fused_gate_up: tuple[str, str] | None = None  # [E, 2I, D]
    fused_down: tuple[str, str] | None = None  # [E, D, I]
    index: int = 0
    # GPT-OSS (layout "gpt_oss"): fused_gate_up is [E, D, 2I] interleaved, fused_down [E, I, D],
    # and the biases [E, 2I] (interleaved) / [E, D]; None elsewhere.
    layout: str = "hf"
    fused_gate_up_bias: tuple[str, str] | None = None
    fused_down_bias: tuple[str, str] | None = None


@dataclass
class ExpertIndex:
    """Expert tensors of a checkpoint by (model layer number, expert id), and the other tensors."""

    experts: dict[tuple[int, int], ExpertLocation] = field(default_factory=dict)
    fused_counts: dict[int, int] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)  # name -> path
    prefixes: dict[int, str] = field(default_factory=dict)  # model layer -> checkpoint block prefix


def index_experts(names: dict[str, str], layout: str = "hf") -> ExpertIndex:
    """Splits checkpoint tensor names into routed-expert tensors and the rest.

    layout: "hf" (every family but GPT-OSS) or "gpt_oss" (x @ W fused tensors, interleaved gate/up,
    expert biases); the caller knows the family (config.json), the names alone do not say.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    idx = ExpertIndex()
    for name, path in names.items():
        m = _FUSED_BIAS.match(name) if layout == "gpt_oss" else None
        if m is not None:
            shape = read_header(path)[name]["shape"]
            layer = int(m["layer"])
            for e in range(int(shape[0])):
                loc = idx.experts.setdefault((layer, e), ExpertLocation(index=e, layout=layout))
                setattr(loc, "fused_" + m["proj"].replace("_proj", ""), (path, name))
            continue
        m = _PER_EXPERT.match(name)
        if m is not None:
            layer, e = int(m["layer"]), int(m["e"])
            loc = idx.experts.setdefault((layer, e), ExpertLocation())
            setattr(loc, _ROLE[m["proj"]], (path, name))
            idx.prefixes[layer] = m["prefix"]
            continue
        m = _FUSED.match(name)
        shape = read_header(path)[name]["shape"] if m is not None else []
        if m is not None and len(shape) == 3:  # a 2-D input_linear is a dense MLP's (Granite's shared_mlp)
            layer = int(m["layer"])
            idx.prefixes[layer] = m["prefix"]
            idx.fused_counts[layer] = int(shape[0])
            for e in range(int(shape[0])):
                loc = idx.experts.setdefault((layer, e), ExpertLocation(index=e, layout=layout))
                if m["proj"] == "gate_up_proj" or m["granite"] == "input_linear":
                    loc.fused_gate_up = (path, name)
                else:
                    loc.fused_down = (path, name)
            continue
        idx.others[name] = path
    return idx


class ShardReader:
    """Open safe_open handles (memory maps), one per shard, reused for every read."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def handle(self, path: str) -> Any:
        """The open safetensors handle of `path` (opened once, memory-mapped)."""
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            try:
                h = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors raises its own error type
                raise CheckpointError(f"cannot open shard {path!r}: {exc}") from exc
            self._handles[path] = h
        return h

    def close(self) -> None:
        """Closes every shard (drops the handles and with them their memory maps)."""
        self._handles.clear()

    def tensor(self, where: tuple[str, str]) -> torch.Tensor:
        """The tensor `name` of shard `path`, read through the memory map."""
        path, key = where
        return self.handle(path).get_tensor(key)

    def shape(self, where: tuple[str, str]) -> list[int]:
        """The shape of tensor `name` in shard `path`, from the header only."""
        path, key = where
        return list(self.handle(path).get_slice(key).get_shape())

    def row(self, where: tuple[str, str], i: int) -> torch.Tensor:
        """Row i of a fused tensor, reading only that row from the memory map."""
        path, key = where
        return self.handle(path).get_slice(key)[i : i + 1][0]

    def expert_shapes(self, loc: ExpertLocation) -> tuple[int, int]:
        """(D, I) of one expert, from headers only."""
        if loc.layout == "gpt_oss":
            return self._gpt_oss_shapes(loc)
        if loc.fused_gate_up is not None and loc.fused_down is not None:
            _, two_i, d = self.shape(loc.fused_gate_up)
            _, d2, i = self.shape(loc.fused_down)
            if d2 != d or two_i != 2 * i:
                raise CheckpointError(f"fused expert shapes disagree: gate_up [*, {two_i}, {d}], down [*, {d2}, {i}]")
            return d, i
        if loc.gate is None or loc.up is None or loc.down is None:
            raise CheckpointError(f"expert tensors incomplete: gate={loc.gate}, up={loc.up}, down={loc.down}")
        i, d = self.shape(loc.gate)
        if self.shape(loc.up) != [i, d] or self.shape(loc.down) != [d, i]:
            raise CheckpointError(f"expert projection shapes disagree for {loc.gate[1]}")
        return d, i

    def read_expert(self, loc: ExpertLocation, out_flat: torch.Tensor, d: int, i: int) -> None:
        """Writes [w_in (D x 2I, gate columns first) | w_out (I x D)] into out_flat (1-D, out's dtype)."""
        w_in = out_flat[: d * 2 * i].view(d, 2 * i)
        w_out = out_flat[d * 2 * i : d * 2 * i + i * d].view(i, d)
        if loc.layout == "gpt_oss":
            assert loc.fused_gate_up is not None and loc.fused_down is not None  # checked by expert_shapes
            w_in.copy_(deinterleave(self.row(loc.fused_gate_up, loc.index)))  # [D, 2I] interleaved on disk
            w_out.copy_(self.row(loc.fused_down, loc.index))
            return
        if loc.fused_gate_up is not None and loc.fused_down is not None:
            w_in.copy_(self.row(loc.fused_gate_up, loc.index).t())
            w_out.copy_(self.row(loc.fused_down, loc.index).t())
            return
        if loc.gate is None or loc.up is None or loc.down is None:
            raise CheckpointError(f"expert tensors incomplete: gate={loc.gate}, up={loc.up}, down={loc.down}")
        w_in[:, :i].copy_(self.tensor(loc.gate).t())
        w_in[:, i:].copy_(self.tensor(loc.up).t())
        w_out.copy_(self.tensor(loc.down).t())

    def _gpt_oss_shapes(self, loc: ExpertLocation) -> tuple[int, int]:
        if loc.fused_gate_up is None or loc.fused_down is None:
            raise CheckpointError(
                f"GPT-OSS expert tensors incomplete: gate_up={loc.fused_gate_up}, down={loc.fused_down}"
            )
        _, d, two_i = self.shape(loc.fused_gate_up)
        _, i, d2 = self.shape(loc.fused_down)
        if d2 != d or two_i != 2 * i:
            raise CheckpointError(f"GPT-OSS expert shapes disagree: gate_up [*, {d}, {two_i}], down [*, {i}, {d2}]")
        for where, want in ((loc.fused_gate_up_bias, [2 * i]), (loc.fused_down_bias, [d])):
            if where is None or self.shape(where)[1:] != want:
                raise CheckpointError(f"GPT-OSS expert biases missing or misshapen: {where} (expected [E, {want[0]}])")
        return d, i

    def read_expert_bias(self, loc: ExpertLocation) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(b_in [2I] gate entries first, b_out [D]) of one expert, or None if the layout has no biases."""
        if loc.fused_gate_up_bias is None or loc.fused_down_bias is None:
            return None
        return deinterleave(self.row(loc.fused_gate_up_bias, loc.index)), self.row(loc.fused_down_bias, loc.index)
