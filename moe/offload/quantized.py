"""Quantized experts in the offload store (issue 19): the byte layout of one quantized expert.

With `OffloadConfig(expert_quant="int8" | "int4")` every tier holds an expert as one flat uint8
buffer of its quantized tensors (moe.quant's formats), so the RAM tier, the device cache and
every host -> device copy carry quantized bytes only, and the budgets (which count
ExpertStore.expert_bytes) count them too. The expert is dequantized on the device at use
(moe.quant.quantized_linear: fused on CPU where the C++ op is built, dequantize-then-matmul
elsewhere, said once in a warning and in OffloadRuntime.quant_path).

Layout of one expert's buffer (no padding: its length is exactly the quantized bytes):

    [scale_in | zero_in | scale_out | zero_out | data_in | data_out]

scales and zero points first (scale_dtype, so every one starts at a multiple of its element
size), then the int8 / packed-int4 weights (zero_* absent for int8). w_in is [D, F], w_out [H, D],
each quantized as one expert [1, K, N] of moe.quant.quantize.

Shape legend: D model dim, H expert hidden dim, F = 2H (SwiGLU), G int4 group size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe.offload.store import ExpertShape, Key
from moe.quant import INT4_GROUP_SIZES, SCHEMES, QuantizedWeight, quantize

__all__ = ["QuantizedExpertShape", "check_expert_quant", "quantizing_reader", "cached_reader"]


def check_expert_quant(scheme: str | None, group_size: int) -> None:
    """ValueError for an unknown scheme or an int4 group size moe.quant does not offer."""
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"unknown expert_quant {scheme!r}; choose one of {SCHEMES} or None (full precision)")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"expert_quant_group_size must be an int, got {group_size!r}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"expert_quant_group_size must be one of {INT4_GROUP_SIZES} for int4, got {group_size}")


@dataclass(frozen=True)
class QuantizedExpertShape(ExpertShape):
    """An ExpertShape whose buffer holds the expert quantized: numel counts bytes (the store's
    dtype is uint8) and views() returns two QuantizedWeight [1, K, N] views of the buffer."""

    scheme: str = "int8"
    group_size: int = 64
    scale_dtype: torch.dtype = torch.float16
    weight_dtype: torch.dtype = torch.float32  # what dequantize() returns by default

    def __post_init__(self) -> None:
        check_expert_quant(self.scheme, self.group_size)
        if self.scheme == "int4":
            for k, what in ((self.dim, "the model dim D"), (self.hidden, "the expert hidden size H")):
                if k % self.group_size:
                    raise ValueError(
                        f"expert_quant_group_size {self.group_size} does not divide {what} = {k}; "
                        f"choose a group size in {INT4_GROUP_SIZES} that divides both D = {self.dim} "
                        f"and H = {self.hidden}, or use expert_quant='int8'"
                    )
                if k % 2:
                    raise ValueError(f"int4 packs two values a byte along K: {what} = {k} must be even")

    def _mats(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.dim, self.width), (self.hidden, self.dim)  # (K, N) of w_in and w_out

    def _parts(self) -> list[tuple[str, int, tuple[int, ...], torch.dtype]]:
        """(name, byte offset, shape, dtype) of every tensor in the buffer, in layout order."""
        parts: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for tag, (k, n) in zip(("in", "out"), self._mats(), strict=True):
            groups = 1 if self.scheme == "int8" else k // self.group_size
            parts.append((f"scale_{tag}", (1, groups, n), self.scale_dtype))
            if self.scheme == "int4":
                parts.append((f"zero_{tag}", (1, groups, n), self.scale_dtype))
        for tag, (k, n) in zip(("in", "out"), self._mats(), strict=True):
            if self.scheme == "int8":
                parts.append((f"data_{tag}", (1, k, n), torch.int8))
            else:
                parts.append((f"data_{tag}", (1, k // 2, n), torch.uint8))
        out, offset = [], 0
        for name, shape, dtype in parts:
            out.append((name, offset, shape, dtype))
            offset += _numel(shape) * dtype.itemsize
        return out

    @property
    def numel(self) -> int:
        """Bytes of the quantized expert (its uint8 buffer's length)."""
        name, offset, shape, dtype = self._parts()[-1]
        return offset + _numel(shape) * dtype.itemsize

    def _tensors(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() < self.numel:
            raise ValueError(f"a quantized expert buffer is uint8 [{self.numel}], got {flat.dtype} {tuple(flat.shape)}")
        return {
            name: flat[offset : offset + _numel(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, offset, shape, dtype in self._parts()
        }

    def views(self, flat: torch.Tensor) -> tuple[QuantizedWeight, QuantizedWeight]:  # type: ignore[override]
        """(w_in [1, D, F], w_out [1, H, D]) as QuantizedWeights viewing the uint8 buffer."""
        t = self._tensors(flat)
        out = []
        for tag, (k, n) in zip(("in", "out"), self._mats(), strict=True):
            group = k if self.scheme == "int8" else self.group_size
            zero = t.get(f"zero_{tag}")
            out.append(
                QuantizedWeight(
                    self.scheme, t[f"data_{tag}"], t[f"scale_{tag}"], zero, group, (1, k, n), self.weight_dtype
                )
            )
        return out[0], out[1]

    def pack(self, w_in_DF: torch.Tensor, w_out_HD: torch.Tensor, out_flat: torch.Tensor) -> None:
        """Quantizes one expert's float weights into out_flat (uint8 [numel])."""
        t = self._tensors(out_flat)
        for tag, w in (("in", w_in_DF), ("out", w_out_HD)):
            qw = quantize(w.unsqueeze(0), self.scheme, self.group_size, self.scale_dtype)
            t[f"data_{tag}"].copy_(qw.data)
            t[f"scale_{tag}"].copy_(qw.scale)
            if qw.zero is not None:
                t[f"zero_{tag}"].copy_(qw.zero)

    def load(self, tensors: dict[str, torch.Tensor], out_flat: torch.Tensor, what: str) -> None:
        """Copies already-quantized tensors {data_in, scale_in, zero_in, ...} (e.g. from a
        quantized checkpoint) into out_flat, checking every shape and dtype first.

        Raises:
            ValueError: a tensor is missing or extra, or its shape or dtype does not match this
                scheme and group size (e.g. scales of another group size); `what` names the expert.
        """
        t = self._tensors(out_flat)
        if set(tensors) != set(t):
            raise ValueError(
                f"{what}: quantized expert tensors {sorted(tensors)} do not match {self.scheme} "
                f"(group {self.group_size}), which stores {sorted(t)}"
            )
        for name, dst in t.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ValueError(
                    f"{what}: {name} is {src.dtype} {tuple(src.shape)}, {self.scheme} with group size "
                    f"{self.group_size} and scale dtype {self.scale_dtype} expects {dst.dtype} {tuple(dst.shape)}: "
                    "the checkpoint was quantized with other settings"
                )
        for name, dst in t.items():
            dst.copy_(tensors[name])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- readers: quantize each read, or read an on-disk quantized expert cache ----

Reader = Callable[[Key, torch.Tensor], None]
CACHE_FORMAT = "moe.offload quantized experts v1"


def quantizing_reader(read_float: Reader, shapes: dict[int, QuantizedExpertShape], dtype: torch.dtype) -> Reader:
    """A store reader that reads an expert in `dtype` (read_float) and quantizes it into the uint8 buffer.

    Quantization is deterministic, so an expert the RAM tier evicted and reads again gets the same bytes.
    """

    def read(key: Key, out_flat: torch.Tensor) -> None:
        shape = shapes[key[0]]
        full = torch.empty(shape.dim * shape.width + shape.hidden * shape.dim, dtype=dtype)
        read_float(key, full)
        n_in = shape.dim * shape.width
        shape.pack(full[:n_in].view(shape.dim, shape.width), full[n_in:].view(shape.hidden, shape.dim), out_flat)

    return read


def _cache_path(cache_dir: str, layer: int) -> str:
    return os.path.join(cache_dir, f"experts-layer{layer}.safetensors")


def _metadata(shape: QuantizedExpertShape, num_experts: int) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "scheme": shape.scheme,
        "group_size": str(shape.group_size),
        "scale_dtype": str(shape.scale_dtype),
        "dim": str(shape.dim),
        "hidden": str(shape.hidden),
        "num_experts": str(num_experts),
    }


def cached_reader(
    cache_dir: str,
    read_float: Reader,
    shapes: dict[int, QuantizedExpertShape],
    num_experts: list[int],
    dtype: torch.dtype,
) -> Reader:
    """A store reader over an on-disk cache of quantized experts in `cache_dir`, one safetensors
    file per MoE layer (experts-layer<l>.safetensors, tensors e<e>.<part>), written here once
    (each expert read with read_float and quantized) where a layer's file is missing.

    An existing file is checked against the settings before anything is read: its metadata
    (scheme, group size, scale dtype, shapes) and every tensor's shape and dtype in its header.

    Raises:
        ValueError: a cache file of other settings, or whose scales / zero points / data do not
            have the shapes of this scheme and group size (delete cache_dir, or load with its settings).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(cache_dir, exist_ok=True)
    quantize_read = quantizing_reader(read_float, shapes, dtype)
    for layer, shape in shapes.items():
        path = _cache_path(cache_dir, layer)
        want = _metadata(shape, num_experts[layer])
        if not os.path.exists(path):  # quantize this layer once, one expert at a time
            tensors = {}
            for e in range(num_experts[layer]):
                flat = torch.empty(shape.numel, dtype=torch.uint8)
                quantize_read((layer, e), flat)
                for name, t in shape._tensors(flat).items():
                    tensors[f"e{e}.{name}"] = t.clone()
            tmp = path + ".partial"
            save_file(tensors, tmp, metadata=want)
            os.replace(tmp, path)  # a crash mid-write never leaves a truncated cache file
            continue
        with safe_open(path, framework="pt") as f:
            have = f.metadata() or {}
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                raise ValueError(
                    f"quantized expert cache {path!r} was written with other settings "
                    f"({', '.join(f'{k}: {a!r} in the file, {b!r} here' for k, (a, b) in diff.items())}); "
                    "delete it or load with the settings it was written with"
                )
            probe = torch.empty(shape.numel, dtype=torch.uint8)
            expected = shape._tensors(probe)
            names = set(f.keys())
            for e in range(num_experts[layer]):
                for name, t in expected.items():
                    key = f"e{e}.{name}"
                    if key not in names:
                        raise ValueError(f"quantized expert cache {path!r} lacks {key}; delete it to rebuild")
                    sl = f.get_slice(key)
                    got_shape, got_dtype = tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if got_shape != tuple(t.shape) or got_dtype != t.dtype:
                        raise ValueError(
                            f"quantized expert cache {path!r}: {key} is {sl.get_dtype()} {got_shape}, "
                            f"{shape.scheme} with group size {shape.group_size} and {shape.scale_dtype} scales "
                            f"expects {t.dtype} {tuple(t.shape)} (scales that do not match the weights); "
                            "delete it to rebuild"
                        )

    handles: dict[int, Any] = {}  # opened on the store's worker thread, the only caller

    def read(key: Key, out_flat: torch.Tensor) -> None:
        layer, e = key
        f = handles.get(layer)
        if f is None:
            f = handles[layer] = safe_open(_cache_path(cache_dir, layer), framework="pt")
        shape = shapes[layer]
        parts = {name: f.get_tensor(f"e{e}.{name}") for name in shape._tensors(out_flat)}
        shape.load(parts, out_flat, f"expert {e} of MoE layer {layer} in {cache_dir!r}")

    return read


_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I8": torch.int8,
    "U8": torch.uint8,
}
