"""Quantized experts (issue 19): what they save in offloaded decoding, simulated and measured.

    python benchmarks/quant_speed.py                  # all three parts, ~5 min on 2 shared cores
    python benchmarks/quant_speed.py --parts timeline # the deterministic part only (seconds)

Parts:
    kernel    the fused CPU dequantize-GEMM (moe::quant_matmul, csrc/quant_matmul_cpu.cpp) against
              dequantize-then-matmul (moe.quant's reference) and the float matmul, on one expert's
              w_in and w_out, for M rows (1 = decode); candidates interleaved, medians.
    timeline  bytes per token and simulated ms/token (moe.offload.timeline) of bf16, int8 and int4
              experts on the transfer-bound preset h100-mixtral and on 4090-qwen3-30b-a3b, on the
              trained tiny LM's routing trace (benchmarks/data), LRU, cache of 25% of the experts:
              "same count" keeps the experts per layer (isolates the smaller copies), "same bytes"
              keeps the cache's bytes (quantized experts: more of them fit).
    generate  tokens/s of examples/offload_generate.py on the CPU (random Mixtral, no --model) with
              --expert-quant none / int8 / int4, interleaved over --repeats, medians.
Writes bench_out/quant_speed.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import statistics
import subprocess
import sys
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import bench_harness as harness  # noqa: E402

import moe.offload as mo  # noqa: E402
from moe.offload import timeline  # noqa: E402
from moe.quant import quantize, quantized_expert_bytes, quantized_matmul  # noqa: E402

TRAINED = os.path.join(_HERE, "data", "trained_tinylm_trace.safetensors")
SCHEMES: tuple[str | None, ...] = (None, "int8", "int4")
# (dim, hidden) of the experts each preset models.
PRESET_SHAPES = {"h100-mixtral": (4096, 14336), "4090-qwen3-30b-a3b": (2048, 768)}
# Assumed fraction of the bf16 GEMV's memory bandwidth a quantized GEMV reaches on the device
# (unpacking costs; the existing int4 preset assumes 0.5 / 0.7) and of the CPU's (int4 unpacking halves it).
DEVICE_EFFICIENCY = {None: 1.0, "int8": 0.9, "int4": 0.5 / 0.7}
CPU_EFFICIENCY = {None: 1.0, "int8": 1.0, "int4": 0.5}


def label(scheme: str | None) -> str:
    return scheme or "bf16"


def quantized_hardware(hw: timeline.Hardware, dim: int, hidden: int, scheme: str | None) -> timeline.Hardware:
    """`hw` with experts of `scheme`: their bytes from moe.quant.quantized_expert_bytes (int4 group 64),
    device and CPU expert times scaled by bytes over an efficiency, one more kernel (5 us host) to dequantize."""
    if scheme is None:
        return hw
    qbytes = quantized_expert_bytes(dim, hidden, scheme, group_size=64)
    ratio = qbytes / hw.expert_bytes
    return dataclasses.replace(
        hw,
        name=f"{hw.name}-{scheme}",
        expert_bytes=qbytes,
        expert_device_s=hw.expert_device_s * ratio / DEVICE_EFFICIENCY[scheme],
        cpu_expert_s=hw.cpu_expert_s * ratio / CPU_EFFICIENCY[scheme],
        expert_host_s=hw.expert_host_s + 5e-6,
        notes=f"{hw.notes}; experts {scheme}",
    )


def run_timeline(rows: list[dict[str, Any]], policies: tuple[str, ...] = ("lru", "predictive")) -> None:
    trace = mo.Trace.load(TRAINED)
    frac = 0.25
    base_cap = max(1, round(frac * trace.num_experts))
    print(f"\n## timeline: trained tiny LM trace ({trace.num_layers} layers x {trace.num_experts} experts), 25% cache")
    print(f"{'preset':>20} {'scheme':>6} {'cache':>10} {'policy':>10} {'MB/token':>10} {'ms/token':>9} {'x bf16':>7}")
    for name, (dim, hidden) in PRESET_SHAPES.items():
        hw16 = timeline.PRESETS[name]
        for policy in policies:
            for mode in ("same count", "same bytes"):
                bf16_ms = None
                for scheme in SCHEMES:
                    hw = quantized_hardware(hw16, dim, hidden, scheme)
                    cap = base_cap
                    if mode == "same bytes":
                        cap = min(trace.num_experts, base_cap * hw16.expert_bytes // hw.expert_bytes)
                    r = timeline.simulate_timeline(trace, policy, cap, hw)
                    bf16_ms = r.ms_per_token if scheme is None else bf16_ms
                    assert bf16_ms is not None
                    print(
                        f"{name:>20} {label(scheme):>6} {mode[5:]:>5} {cap:>4} {policy:>10} "
                        f"{r.bytes_per_token / 1e6:10.1f} {r.ms_per_token:9.2f} {r.ms_per_token / bf16_ms:7.3f}"
                    )
                    rows.append(
                        dict(part="timeline", preset=name, scheme=label(scheme), cache=mode, capacity=cap,
                             policy=policy, expert_bytes=hw.expert_bytes, bytes_per_token=round(r.bytes_per_token),
                             sim_ms_per_token=round(r.ms_per_token, 4), vs_bf16=round(r.ms_per_token / bf16_ms, 4),
                             hit_rate=round(r.hit_rate, 4))
                    )  # fmt: skip


def _pair(x: torch.Tensor, h: torch.Tensor, q_in: Any, q_out: Any, path: str) -> Any:
    return quantized_matmul(x, q_in, path=path), quantized_matmul(h, q_out, path=path)


def _float_pair(x: torch.Tensor, h: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> Any:
    return x @ w_in, h @ w_out


def run_kernel(rows: list[dict[str, Any]], reps: int) -> None:
    torch.manual_seed(0)
    dim, hidden = 1024, 1024  # a mid-size expert: w_in [1024, 2048], w_out [1024, 1024]
    threads = torch.get_num_threads()
    print(f"\n## fused CPU dequantize-GEMM vs dequantize-then-matmul, D={dim}, H={hidden}, {threads} threads")
    print(f"{'scheme':>6} {'M':>4} {'fused ms':>9} {'deq+mm ms':>10} {'fp32 mm ms':>11} {'fused/deq':>10}")
    for scheme in ("int8", "int4"):
        w_in, w_out = torch.randn(1, dim, 2 * hidden) * 0.02, torch.randn(1, hidden, dim) * 0.02
        q_in, q_out = quantize(w_in, scheme, 64), quantize(w_out, scheme, 64)
        for m in (1, 4, 16, 64):
            x, h = torch.randn(m, dim), torch.randn(m, hidden)

            fns = {
                "fused": functools.partial(_pair, x, h, q_in, q_out, "fused-cpu"),
                "deq": functools.partial(_pair, x, h, q_in, q_out, "dequantize-then-matmul"),
                "fp32": functools.partial(_float_pair, x, h, w_in[0], w_out[0]),
            }
            med = harness.medians(harness.time_interleaved(fns, reps, warmup=2))
            f, d, p = (1e3 * med[k] for k in ("fused", "deq", "fp32"))
            print(f"{scheme:>6} {m:>4} {f:9.3f} {d:10.3f} {p:11.3f} {f / d:10.3f}")
            rows.append(
                dict(part="kernel", scheme=scheme, rows=m, fused_ms=round(f, 4), dequant_matmul_ms=round(d, 4),
                     fp32_matmul_ms=round(p, 4), fused_vs_dequant=round(f / d, 4))
            )  # fmt: skip


def run_generate(rows: list[dict[str, Any]], repeats: int, tokens: int, threads: int) -> None:
    script = os.path.join(_HERE, "..", "examples", "offload_generate.py")
    print(f"\n## examples/offload_generate.py on CPU, {tokens} new tokens, random Mixtral (8 layers x 16 experts)")
    samples: dict[str, list[float]] = {s or "none": [] for s in SCHEMES}  # the random model is fp32
    moved: dict[str, str] = {}
    for _ in range(repeats):
        for scheme in SCHEMES:
            cmd = [sys.executable, script, "--device", "cpu", "--max-new-tokens", str(tokens),
                   "--threads", str(threads), "--expert-quant", scheme or "none"]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            m = re.search(r"= ([\d.]+) tokens/s", out.stderr)
            b = re.search(r"bytes moved ([\d.]+) MiB", out.stderr)
            assert m is not None and b is not None, out.stderr[-2000:]
            samples[scheme or "none"].append(float(m.group(1)))
            moved[scheme or "none"] = b.group(1)
    base = statistics.median(samples["none"])
    print(f"{'scheme':>6} {'tokens/s (median)':>18} {'x none':>7} {'MiB moved':>10}  samples")
    for name, vals in samples.items():
        med = statistics.median(vals)
        print(f"{name:>6} {med:18.2f} {med / base:7.2f} {moved[name]:>10}  {vals}")
        rows.append(dict(part="generate", scheme=name, tokens_per_s=round(med, 3), vs_none=round(med / base, 4),
                         mib_moved=moved[name]))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="*", default=["kernel", "timeline", "generate"])
    p.add_argument("--reps", type=int, default=15, help="kernel timing repetitions")
    p.add_argument("--repeats", type=int, default=3, help="generate runs per scheme (interleaved)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if "kernel" in args.parts:
        run_kernel(rows, args.reps)
    if "timeline" in args.parts:
        run_timeline(rows)
    if "generate" in args.parts:
        run_generate(rows, args.repeats, args.tokens, args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "quant_speed.csv")
    harness.write_csv(path, rows, fieldnames=sorted({k for r in rows for k in r}))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
