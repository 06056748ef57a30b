"""Load balance vs quality of the routers on the tiny byte-level MoE LM (examples/tiny_lm.py).

Trains the same model (same init and batches per seed) once per router and seed, routers
interleaved within each seed, and prints held-out loss and MaxVio per router (means over
seeds), with MaxVio ratios against the aux-loss-1e-3 baseline and loss deltas.

MaxVio = (max_i load_i - mean load) / mean load, per MoE layer, averaged over layers and over
the last --maxvio-window training steps ("train MaxVio"); "held-out MaxVio" is the same on
the held-out batches in eval mode. aux_free scores with a sigmoid (DeepSeek-V3); aux_free_softmax
uses the softmax scores of the aux-loss routers, so that only the balancing method differs.

    python benchmarks/balance.py            # default: 16 experts, top-2, 1000 steps, 2 seeds
    python benchmarks/balance.py --quick    # ~2 min smoke run
    python benchmarks/balance.py --seeds 3 --csv --png
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_lm import ByteData, TinyLM, TinyLMConfig, TrainConfig, load_stdlib_bytes, train  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402

BASELINE = "aux_1e-3"
OUT_DIR = Path(__file__).resolve().parents[1] / "bench_out"


@dataclass(frozen=True)
class RouterSpec:
    """One benchmarked router: its moe.MoE router name and config options."""

    name: str
    router: str
    options: dict[str, Any]


def router_specs(bias_update_rate: float = 1e-3, recurrent_dim: int = 64) -> list[RouterSpec]:
    """The compared routers: no balancing, aux loss 1e-3 and 1e-2, aux-free (sigmoid and softmax scores), recurrent."""
    return [
        RouterSpec("none", "topk", {"aux_loss_coef": 0.0}),
        RouterSpec("aux_1e-3", "topk", {"aux_loss_coef": 1e-3}),
        RouterSpec("aux_1e-2", "topk", {"aux_loss_coef": 1e-2}),
        RouterSpec("aux_free", "aux_free", {"score_func": "sigmoid", "bias_update_rate": bias_update_rate}),
        # the same balancing with the aux-loss routers' softmax scores: only the balancing method differs
        RouterSpec("aux_free_softmax", "aux_free", {"score_func": "softmax", "bias_update_rate": bias_update_rate}),
        RouterSpec("recurrent", "recurrent", {"recurrent_dim": recurrent_dim, "aux_loss_coef": 1e-2}),
    ]


def run_one(
    spec: RouterSpec, seed: int, model_cfg: TinyLMConfig, train_cfg: TrainConfig, data: ByteData, progress: bool
) -> dict[str, Any]:
    """Trains one model with `spec`'s router; returns a result row."""
    torch.manual_seed(seed)
    model = TinyLM(replace(model_cfg, router=spec.router, router_options=spec.options))
    result = train(model, data, replace(train_cfg, seed=seed), progress=progress, desc=f"{spec.name} s{seed}")
    return {
        "router": spec.name,
        "seed": seed,
        "heldout_loss": result.heldout_loss,
        "train_loss": result.train_loss,
        "max_vio": result.max_vio,
        "heldout_max_vio": result.heldout_max_vio,
        "ms_per_step": 1e3 * result.seconds / max(1, train_cfg.steps),
        "max_vio_curve": result.max_vios,
    }


def run_benchmark(
    specs: list[RouterSpec],
    seeds: list[int],
    model_cfg: TinyLMConfig,
    train_cfg: TrainConfig,
    data: ByteData,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """All (seed, router) runs, routers interleaved within each seed so machine noise is shared.

    Each finished run is printed at once, so a cut-short run still leaves its rows.
    """
    rows = []
    for seed in seeds:
        for spec in specs:
            row = run_one(spec, seed, model_cfg, train_cfg, data, progress)
            if progress:
                print(
                    f"  {row['router']} seed {seed}: held-out loss {row['heldout_loss']:.4f}, "
                    f"MaxVio {row['max_vio']:.3f} (held-out {row['heldout_max_vio']:.3f}), "
                    f"{row['ms_per_step']:.0f} ms/step",
                    flush=True,
                )
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per router: means over seeds, MaxVio ratio to the baseline and loss delta to it."""
    names = list(dict.fromkeys(r["router"] for r in rows))
    keys = ("heldout_loss", "train_loss", "max_vio", "heldout_max_vio", "ms_per_step")
    table = []
    for name in names:
        mine = [r for r in rows if r["router"] == name]
        entry: dict[str, Any] = {"router": name, "seeds": len(mine)}
        for key in keys:
            values = [r[key] for r in mine]
            entry[key] = statistics.fmean(values)
            entry[key + "_min"], entry[key + "_max"] = min(values), max(values)
        table.append(entry)
    base = next((e for e in table if e["router"] == BASELINE), table[0])
    for entry in table:
        entry["max_vio_ratio"] = entry["max_vio"] / base["max_vio"] if base["max_vio"] > 0 else float("nan")
        entry["loss_delta"] = entry["heldout_loss"] - base["heldout_loss"]
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    base = next((e["router"] for e in table if e["router"] == BASELINE), table[0]["router"])
    header = (
        f"| router | held-out loss | Δloss vs {base} | train MaxVio (min-max) | MaxVio / {base} "
        "| held-out MaxVio | ms/step |"
    )
    lines = [header, "|" + "---|" * 7]
    for e in table:
        lines.append(
            f"| {e['router']} | {e['heldout_loss']:.4f} | {e['loss_delta']:+.4f} "
            f"| {e['max_vio']:.3f} ({e['max_vio_min']:.2f}-{e['max_vio_max']:.2f}) | {e['max_vio_ratio']:.3f} "
            f"| {e['heldout_max_vio']:.3f} | {e['ms_per_step']:.0f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = [k for k in rows[0] if k != "max_vio_curve"]
    harness.write_csv(path, [{k: r[k] for k in fields} for r in rows], fieldnames=fields)


def write_png(rows: list[dict[str, Any]], path: Path, window: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["router"] for r in rows):
        curves = [r["max_vio_curve"] for r in rows if r["router"] == name]
        mean = [statistics.fmean(vals) for vals in zip(*curves, strict=True)]
        smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
        ax.plot(smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"MaxVio (mean over layers, {window}-step moving average)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run (~2 min): 300 steps, 1 seed")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; --quick 300)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per router (default 2; --quick 1)")
    p.add_argument(
        "--routers",
        default=None,
        help="comma-separated subset of: none,aux_1e-3,aux_1e-2,aux_free,aux_free_softmax,recurrent",
    )
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-free gamma")
    p.add_argument("--maxvio-window", type=int, default=100, help="average MaxVio over the last N steps")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: 2 threads ran 13-24x slower on a loaded 2-core box)"
    )
    p.add_argument("--csv", action="store_true", help="write bench_out/balance.csv")
    p.add_argument("--png", action="store_true", help="write bench_out/balance.png (MaxVio curves)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no per-run lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (300 if args.quick else 1000)
    num_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    specs = router_specs(args.bias_update_rate)
    if args.routers:
        wanted = args.routers.split(",")
        unknown = sorted(set(wanted) - {s.name for s in specs})
        if unknown:
            raise SystemExit(f"unknown router(s) {unknown}; choose from {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    model_cfg = TinyLMConfig(
        dim=args.dim, num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, max_seq_len=args.seq_len
    )
    train_cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        maxvio_window=min(args.maxvio_window, steps),
    )
    data = load_stdlib_bytes()
    print(
        f"tiny LM: {args.layers} layers, dim {args.dim}, {args.experts} experts, top-{args.top_k}, "
        f"{steps} steps x {args.batch_size}x{args.seq_len} tokens, seeds {num_seeds}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    start = time.perf_counter()
    rows = run_benchmark(specs, list(range(num_seeds)), model_cfg, train_cfg, data, progress=not args.no_progress)
    table = summarize(rows)
    print(format_table(table))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.csv or args.png:
        OUT_DIR.mkdir(exist_ok=True)
    if args.csv:
        write_csv(rows, OUT_DIR / "balance.csv")
        print(f"wrote {OUT_DIR / 'balance.csv'}")
    if args.png:
        write_png(rows, OUT_DIR / "balance.png")
        print(f"wrote {OUT_DIR / 'balance.png'}")
    return table


if __name__ == "__main__":
    main()
