"""GPU memory bandwidth of the CUDA moe:: index ops against a device-to-device copy of the same bytes.

For each op and shape: our CUDA kernel (torch.ops.moe.*, from moe._C), the pure-PyTorch
reference (moe.reference: index_select, index_add in fp32, torch.sort) and the floor: one
tensor copy that reads and writes as many bytes as the op must move. Candidates are
interleaved, timed with CUDA events over --inner calls per sample, and reported as medians:
time, effective GB/s (bytes the op must move / time), % of the copy's bandwidth, and our
speed-up over the reference.

Shapes: T tokens, D dim, E experts, K copies per token, N = T * K rows.

    python3 setup.py build_ext --inplace && python3 benchmarks/cuda_ops.py
    python3 benchmarks/cuda_ops.py --dtype float16 --reps 50 --csv
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe import reference  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402

OUT_DIR = Path(__file__).resolve().parents[1] / "bench_out"
# (name, T, D, E, K): Mixtral-like and fine-grained (DeepSeek / Qwen3-MoE-like) layers.
CONFIGS = [("mixtral", 8192, 4096, 8, 2), ("fine", 8192, 2048, 128, 8)]
SORT_SIZES = [("N=1M", 1 << 20, 64)]


def load_kernels() -> None:
    """Imports moe._C and checks its CUDA kernels are registered (exits with a hint if not)."""
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cuda_ops.py needs a CUDA device")
    try:
        import moe._C  # noqa: F401
    except ImportError as err:
        sys.exit(f"moe._C is not built ({err}); run `python3 setup.py build_ext --inplace` first")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("moe::permute", "CUDA"):
        sys.exit("moe._C has no CUDA kernels: rebuild with a CUDA torch and nvcc on PATH")


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, inner: int) -> dict[str, float]:
    """Median microseconds per call of each fn, candidates interleaved within every rep."""
    samples = harness.time_interleaved(fns, reps, warmup=3, inner=inner, device="cuda")
    return {name: 1e6 * t for name, t in harness.medians(samples).items()}


def copy_floor(num_bytes: int) -> Callable[[], object]:
    """A device copy that reads num_bytes / 2 and writes num_bytes / 2."""
    src = torch.empty(max(1, num_bytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] (distinct experts per token, uniform) and weights [T, K] fp32."""
    ids_TK = torch.rand(t, e, device="cuda").argsort(dim=1)[:, :k].contiguous()
    return ids_TK, torch.rand(t, k, device="cuda")


def cases(dtype: torch.dtype) -> list[tuple[str, str, int, dict[str, Callable[[], object]]]]:
    """(op, shape, bytes moved, {candidate: fn}) for every benchmarked op."""
    out = []
    b = torch.tensor([], dtype=dtype).element_size()
    ops = torch.ops.moe
    for name, t, d, e, k in CONFIGS:
        ids_TK, w_TK = routing(t, e, k)
        order, _ = reference.sort_by_expert(ids_TK, e)
        n = order.numel()
        token_idx_N, w_N = order // k, w_TK.reshape(-1)[order]
        x_TD = torch.randn(t, d, device="cuda", dtype=dtype)
        y_ND = torch.randn(n, d, device="cuda", dtype=dtype)
        g_TD = torch.randn(t, d, device="cuda", dtype=dtype)
        shape = f"{name} T={t} D={d} E={e} K={k}"
        out.append(
            (
                "sort_by_expert",
                shape,
                2 * 8 * n,
                {
                    "ours": lambda ids=ids_TK, e=e: ops.sort_by_expert(ids, e),
                    "reference": lambda ids=ids_TK, e=e: reference.sort_by_expert(ids, e),
                },
            )
        )
        out.append(
            (
                "permute",
                shape,
                2 * n * d * b + 8 * n,
                {
                    "ours": lambda x=x_TD, i=token_idx_N: ops.permute(x, i),
                    "reference": lambda x=x_TD, i=token_idx_N: reference.permute(x, i),
                },
            )
        )
        out.append(
            (
                "unpermute",
                shape,
                (n + t) * d * b + 12 * n,  # rows in and out, int64 index + fp32 weight per row
                {
                    "ours": lambda y=y_ND, i=token_idx_N, w=w_N, t=t: ops.unpermute(y, i, w, t),
                    "reference": lambda y=y_ND, i=token_idx_N, w=w_N, t=t: reference.unpermute(y, i, w, t),
                },
            )
        )
        out.append(
            (
                "scatter_rows",
                shape,
                (n + t) * d * b + 8 * n,
                {
                    "ours": lambda y=y_ND, i=token_idx_N, t=t: ops.scatter_rows(y, i, t),
                    "reference": lambda y=y_ND, i=token_idx_N, t=t: y.new_zeros(t, y.shape[1]).index_add_(0, i, y),
                },
            )
        )
        out.append(
            (
                "unpermute_backward",
                shape,
                3 * n * d * b + 16 * n,
                {
                    "ours": lambda g=g_TD, y=y_ND, i=token_idx_N, w=w_N: ops.unpermute_backward(g, y, i, w),
                    "reference": lambda g=g_TD, y=y_ND, i=token_idx_N, w=w_N: (
                        g.index_select(0, i) * w.to(g.dtype)[:, None],
                        (g.index_select(0, i).float() * y.float()).sum(1),
                    ),
                },
            )
        )
    for name, n, e in SORT_SIZES:
        ids_N = torch.randint(-1, e, (n,), device="cuda")
        out.append(
            (
                "sort_by_expert",
                f"{name} E={e}",
                2 * 8 * n,
                {
                    "ours": lambda ids=ids_N, e=e: ops.sort_by_expert(ids, e),
                    "reference": lambda ids=ids_N, e=e: reference.sort_by_expert(ids, e),
                },
            )
        )
    return out


def table_row(op: str, shape: str, num_bytes: int, us: dict[str, float]) -> dict[str, object]:
    """One result row from the median microseconds of "ours", "reference" and "copy"."""
    return {
        "op": op,
        "shape": shape,
        "MB": num_bytes / 1e6,
        "ours_us": us["ours"],
        "reference_us": us["reference"],
        "copy_us": us["copy"],
        "ours_GBps": num_bytes / us["ours"] / 1e3,  # bytes per microsecond / 1e3 = GB/s
        "pct_of_copy": 100 * us["copy"] / us["ours"],
        "speedup_vs_reference": us["reference"] / us["ours"],
    }


def format_row(r: dict[str, Any]) -> str:
    return (
        f"{r['op']:<19} {r['shape']:<34} {r['MB']:>8.1f} {r['ours_us']:>9.1f} {r['reference_us']:>9.1f}"
        f" {r['copy_us']:>9.1f} {r['ours_GBps']:>10.0f} {r['pct_of_copy']:>6.0f}% {r['speedup_vs_reference']:>6.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=30, help="timed samples per candidate (median reported)")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--csv", action="store_true", help=f"also write {OUT_DIR}/cuda_ops.csv")
    args = parser.parse_args()
    load_kernels()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, reps={args.reps}")
    header = f"{'op':<19} {'shape':<34} {'MB':>8} {'ours us':>9} {'ref us':>9} {'copy us':>9}"
    header += f" {'ours GB/s':>10} {'% copy':>7} {'vs ref':>7}"
    print(header)
    rows = []
    for op, shape, num_bytes, fns in cases(dtype):
        fns = {**fns, "copy": copy_floor(num_bytes)}
        row = table_row(op, shape, num_bytes, time_interleaved(fns, args.reps, args.inner))
        rows.append(row)
        print(format_row(row))
    if args.csv:
        OUT_DIR.mkdir(exist_ok=True)
        path = OUT_DIR / "cuda_ops.csv"
        harness.write_csv(path, rows)
        print(f"# wrote {path}")


if __name__ == "__main__":
    main()
