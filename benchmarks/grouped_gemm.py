"""The Triton grouped GEMM alone on a CUDA GPU, against dense cuBLAS, torch._grouped_mm and a per-expert loop.

    python3 benchmarks/grouped_gemm.py [--csv] [--only a|b] [--rounds 3]

Needs CUDA, torch and Triton; moe need not be installed (the kernels are this checkout's kernels/,
imported as moe.kernels). On a machine without CUDA it says so and exits 0.

Cases (bf16, fp32 accumulation):
    a        8 experts x 8192 rows, K=4096, N=14336: forward y = x @ w[e]; backward dX = dy @ w[e]^T
             and dW[e] = x_e^T @ dy_e (our kernels vs the dense cuBLAS GEMM of the same FLOPs).
    b_*      fine-grained: 128 experts, top-8 random routing of 8192 tokens (M = 65536 rows),
             dim 2048, hidden 768:
             b_in_swiglu   x @ w_in [2048 -> 2*768], SwiGLU in our epilogue (peers: GEMM + silu*up)
             b_in          x @ w [2048 -> 768]
             b_out         h @ w_out [768 -> 2048]
             b_in_gather   our gather + GEMM + SwiGLU in one kernel from unsorted tokens
                           (peers: index_select to sorted rows, then their GEMM + silu*up)
Candidates per case: ours (moe.kernels.ops entry points, autotuned: the first call tunes and is not
timed), dense (torch.mm on (sum M, K) x (K, N)), grouped_mm (torch._grouped_mm with int32 offsets,
the faster of the two weight layouts it accepts), loop (torch.mm per expert into slices of one
output). Timing: triton.testing.do_bench medians (L2 flushed between runs), candidates
interleaved over --rounds rounds, median of rounds. TFLOP/s = 2 M K N / time (SwiGLU: N = 2H).
Correctness: max abs error of ours vs the per-expert loop (fp32 reference where noted) on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_kernels():  # type: ignore[no-untyped-def]
    """(ops, grouped_gemm): moe.kernels from this checkout's kernels/ (also when moe is not installed)."""
    sys.path.insert(0, str(ROOT))
    from moe.kernels import grouped_gemm, ops

    return ops, grouped_gemm


def bench(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms: triton.testing.do_bench on CUDA; a wall clock for the CPU smoke run."""
    if device.type != "cuda":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def offsets_i32(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def torch_grouped_mm(
    x_probe: torch.Tensor, w: torch.Tensor, counts: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x -> torch._grouped_mm(x, w, offs) in the faster layout it accepts (w row- or column-major), or None."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        print("    torch._grouped_mm: not in this torch build", flush=True)
        return None
    offs = offsets_i32(counts)
    best: tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None = None
    # Row-major [E, K, N] and column-major (the same values, K contiguous): for a transposed view
    # w (the dX case), the second form of a view would equal it, so both are built from scratch.
    for layout in (w.contiguous(), w.transpose(1, 2).contiguous().transpose(1, 2)):

        def call(x: torch.Tensor, layout: torch.Tensor = layout) -> torch.Tensor:
            return fn(x, layout, offs=offs)

        try:
            call(x_probe)
            sync(x_probe.device)
            ms = bench(lambda call=call: call(x_probe), x_probe.device)
        except Exception as err:  # layout or dtype not supported by this build
            print(f"    torch._grouped_mm: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
            continue
        if best is None or ms < best[0]:
            best = (ms, call)
    return None if best is None else best[1]


def bind(fn: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    return None if fn is None else (lambda: fn(x))


def loop_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, out_cols: int) -> Callable[[], torch.Tensor]:
    """torch.mm per expert into slices of one output (bounds computed once, outside the timing)."""
    bounds, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            bounds.append((e, start, start + c))
        start += c
    out = torch.zeros(x.shape[0], out_cols, dtype=x.dtype, device=x.device)

    def run() -> torch.Tensor:
        for e, s, t in bounds:
            torch.mm(x[s:t], w[e], out=out[s:t])
        return out

    return run


def errors_of(label: str, ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """{"label (max |ref| = s)": max abs error of ours vs ref}."""
    scale = ref.float().abs().max().item()
    return {f"{label} (max |ref| = {scale:.3g})": (ours.float() - ref.float()).abs().max().item()}


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def run_case(
    device: torch.device,
    name: str,
    flops: float,
    candidates: dict[str, Callable[[], object] | None],
    rounds: int,
    errors: dict[str, float],
    rows: list[dict],
) -> None:
    live = {k: v for k, v in candidates.items() if v is not None}
    for fn in live.values():  # warm-up: compiles and autotunes ours
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(rounds):
        for k, fn in live.items():
            times[k].append(bench(fn, device))
    ms = {k: statistics.median(v) for k, v in times.items()}
    ours = ms["ours"]
    print(f"\n{name}: {flops / 1e12:.2f} TFLOP per call", flush=True)
    for k, t in ms.items():
        line = f"  {k:<15} {t:9.3f} ms {tflops(flops, t):8.1f} TFLOP/s"
        if k == "dense":
            line += f"   ours = {100 * t / ours:5.1f}% of dense cuBLAS"
        elif k != "ours":
            line += f"   ours is {t / ours:5.2f}x faster"
        print(line, flush=True)
        rows.append(
            dict(
                case=name,
                candidate=k,
                ms=round(t, 4),
                tflops=round(tflops(flops, t), 2),
                ours_speedup=round(t / ours, 3),
                max_abs_err=next(iter(errors.values()), "") if k == "ours" else "",
            )
        )
    for k, err in errors.items():
        print(f"  max abs err {k}: {err:.3e}", flush=True)


def case_a(ops, rounds: int, rows: list[dict], smoke: bool) -> None:  # type: ignore[no-untyped-def]
    E, rows_per, K, N = (3, 40, 32, 48) if smoke else (8, 8192, 4096, 14336)
    dev, dt = torch.device("cpu" if smoke else "cuda"), torch.bfloat16
    counts = torch.full((E,), rows_per, dtype=torch.int64, device=dev)
    M = E * rows_per
    x = torch.randn(M, K, device=dev, dtype=dt)
    w = torch.randn(E, K, N, device=dev, dtype=dt) / K**0.5
    flops = 2.0 * M * K * N
    loop = loop_mm(x, w, counts, N)
    y, y_ref = ops.grouped_mm(x, w, counts), loop().clone()
    err = errors_of("ours vs loop", y, y_ref)
    run_case(
        dev,
        "a_fwd",
        flops,
        {
            "ours": lambda: ops.grouped_mm(x, w, counts),
            "dense": lambda: torch.mm(x, w[0]),
            "grouped_mm": bind(torch_grouped_mm(x, w, counts), x),
            "loop": loop,
        },
        rounds,
        err,
        rows,
    )
    del y, y_ref
    dy = torch.randn(M, N, device=dev, dtype=dt)
    w_t = w.transpose(1, 2)
    dx = ops.fused_grouped_mm(dy, w_t, counts)
    dx_ref = loop_mm(dy, w_t, counts, K)()
    err = errors_of("ours vs loop", dx, dx_ref)
    del dx, dx_ref
    run_case(
        dev,
        "a_bwd_dx",
        flops,
        {
            "ours": lambda: ops.fused_grouped_mm(dy, w_t, counts),
            "dense": lambda: torch.mm(dy, w_t[0]),
            "grouped_mm": bind(torch_grouped_mm(dy, w_t, counts), dy),
            "loop": loop_mm(dy, w_t, counts, K),
        },
        rounds,
        err,
        rows,
    )
    dw = ops.grouped_mm_wgrad(x, dy, counts)
    seg = [slice(e * rows_per, (e + 1) * rows_per) for e in range(E)]
    err = errors_of("ours vs loop", dw, torch.stack([x[r].t() @ dy[r] for r in seg]))
    del dw

    dw_loop = torch.empty(E, K, N, device=dev, dtype=dt)

    def wgrad_loop() -> torch.Tensor:
        for e, r in enumerate(seg):
            torch.mm(x[r].t(), dy[r], out=dw_loop[e])
        return dw_loop

    run_case(
        dev,
        "a_bwd_dw",
        flops,
        {
            "ours": lambda: ops.grouped_mm_wgrad(x, dy, counts),
            "dense": lambda: torch.mm(x.t(), dy),  # (K, M) @ (M, N): the same FLOPs
            "loop": wgrad_loop,
        },
        rounds,
        err,
        rows,
    )


def case_b(ops, rounds: int, rows: list[dict], smoke: bool) -> None:  # type: ignore[no-untyped-def]
    E, top_k, T, D, H = (8, 2, 24, 32, 24) if smoke else (128, 8, 8192, 2048, 768)
    dev, dt = torch.device("cpu" if smoke else "cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randn(T, E, device=dev, generator=gen).topk(top_k, dim=1).indices.reshape(-1)
    order = torch.sort(ids, stable=True).indices
    token_idx = order // top_k
    counts = torch.bincount(ids, minlength=E)
    M = T * top_k
    print(f"\nfine-grained routing: M={M}, rows per expert min {int(counts.min())} max {int(counts.max())}", flush=True)
    x_TD = torch.randn(T, D, device=dev, dtype=dt)
    x = x_TD.index_select(0, token_idx)
    w_in = torch.randn(E, D, 2 * H, device=dev, dtype=dt) / D**0.5
    w_gate = w_in[:, :, :H].contiguous()
    w_out = torch.randn(E, H, D, device=dev, dtype=dt) / H**0.5
    h = torch.randn(M, H, device=dev, dtype=dt)

    # SwiGLU first GEMM: ours fused vs GEMM (+ activation) for the peers.
    ref = swiglu(loop_mm(x, w_in, counts, 2 * H)().float())
    ours = ops.fused_grouped_mm(x, w_in, counts, activation="swiglu")
    err = errors_of("ours vs fp32 loop", ours, ref)
    peer = torch_grouped_mm(x, w_in, counts)
    loop_in = loop_mm(x, w_in, counts, 2 * H)
    run_case(
        dev,
        "b_in_swiglu",
        2.0 * M * D * 2 * H,
        {
            "ours": lambda: ops.fused_grouped_mm(x, w_in, counts, activation="swiglu"),
            "dense": lambda: torch.mm(x, w_in[0]),
            "grouped_mm": bind(peer, x),
            "grouped_mm+act": (lambda: swiglu(peer(x))) if peer is not None else None,
            "loop+act": lambda: swiglu(loop_in()),
        },
        rounds,
        err,
        rows,
    )
    # Gather fused: ours reads x_TD through token_idx; the peers gather to sorted rows first.
    ours_g = ops.fused_grouped_mm(x_TD, w_in, counts, token_idx, activation="swiglu")
    err = errors_of("ours vs fp32 loop", ours_g, ref)

    def peer_gather() -> torch.Tensor:
        assert peer is not None
        return swiglu(peer(x_TD.index_select(0, token_idx)))

    def loop_gather() -> torch.Tensor:
        torch.index_select(x_TD, 0, token_idx, out=x)  # loop_in reads x
        return swiglu(loop_in())

    run_case(
        dev,
        "b_in_gather",
        2.0 * M * D * 2 * H,
        {
            "ours": lambda: ops.fused_grouped_mm(x_TD, w_in, counts, token_idx, activation="swiglu"),
            "grouped_mm+act": peer_gather if peer is not None else None,
            "loop+act": loop_gather,
        },
        rounds,
        err,
        rows,
    )
    del ref, ours, ours_g

    for name, a, w, n in (("b_in", x, w_gate, H), ("b_out", h, w_out, D)):
        k = a.shape[1]
        y_ref = loop_mm(a, w, counts, n)()
        err = errors_of("ours vs loop", ops.grouped_mm(a, w, counts), y_ref)
        run_case(
            dev,
            name,
            2.0 * M * k * n,
            {
                "ours": lambda a=a, w=w: ops.grouped_mm(a, w, counts),
                "dense": lambda a=a, w=w: torch.mm(a, w[0]),
                "grouped_mm": bind(torch_grouped_mm(a, w, counts), a),
                "loop": loop_mm(a, w, counts, n),
            },
            rounds,
            err,
            rows,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", action="store_true", help="write bench_out/grouped_gemm.csv")
    parser.add_argument("--only", choices=["a", "b"], help="run one case family")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over rounds)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter): checks the script")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/grouped_gemm.py needs a CUDA GPU (Triton kernels); none found, nothing to do.")
        return
    import triton

    ops, grouped_gemm = load_kernels()
    torch.manual_seed(0)
    device = "CPU smoke run (interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__} | bf16", flush=True)
    rows: list[dict] = []
    if args.only in (None, "a"):
        case_a(ops, args.rounds, rows, args.smoke)
        if not args.smoke:
            torch.cuda.empty_cache()
    if args.only in (None, "b"):
        case_b(ops, args.rounds, rows, args.smoke)
    if not args.smoke:
        for label, tuner in (
            ("fwd", grouped_gemm._fwd_kernel(False, True)),
            ("wgrad", grouped_gemm._wgrad_kernel(False, True)),
        ):
            for key, config in tuner.cache.items():
                print(f"autotuned {label} {key[:8]}: {config}")
    if args.csv:
        os.makedirs(ROOT / "bench_out", exist_ok=True)
        path = ROOT / "bench_out" / "grouped_gemm.csv"
        harness.write_csv(path, rows)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
