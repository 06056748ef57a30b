"""DeepSpeed-MoE's model side on the tiny byte-level LM: standard MoE, Residual MoE, PR-MoE, MoS student.

Every row trains on the same batches for the same steps (examples/tiny_lm.py: stdlib sources,
same init seed) and reports parameters, parameters active per token, held-out loss (nats/byte)
and ms/step (wall time of the training loop / steps; the distilled row includes the teacher's
forward while KD is on). Rows:

    standard   E experts in every layer, top-1 (the paper's MoE-E baseline, here top-1 as there)
    top-2      the same with top-2: the compute-matched baseline of residual / PR-MoE (two expert
               MLPs per token, as residual's dense branch + one expert)
    residual   the same + a dense MLP branch per layer (Residual MoE), top-1
    pr-moe     pyramid (E/2 experts in the first half of the layers, E in the rest) + residual
    student    the PR-MoE student (fewer layers) trained without KD: what the distillation adds
    mos        the same student with staged KD from the trained pr-moe row (the KD term is
               switched off at 3/4 of the steps), same steps and batches

The paper's claim: PR-MoE reaches the standard MoE's quality with clearly fewer parameters.

    python benchmarks/pr_moe.py                  # defaults: 4 layers, E = 8, 300 steps (a few CPU minutes)
    python benchmarks/pr_moe.py --steps 1000 --csv
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from tiny_lm import TinyLM, TinyLMConfig, TrainConfig, load_stdlib_bytes, train  # noqa: E402

from moe.distill import DistillConfig, Distiller  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
import bench_harness as harness  # noqa: E402

KINDS = ("standard", "top-2", "residual", "pr-moe", "student", "mos")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Standard MoE vs Residual MoE vs PR-MoE vs MoS student on the tiny LM.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=8, help="E of the standard model and of the pyramid's top half")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64, help="expert (and dense branch) hidden width")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-bytes", type=int, default=2_000_000)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--kd-stop", type=float, default=0.75, help="fraction of the steps after which KD is off")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", action="store_true", help="write bench_out/pr_moe.csv")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, kind: str) -> TinyLMConfig:
    layers = args.student_layers if kind in ("student", "mos") else args.layers
    e = args.experts
    experts: int | tuple[int, ...] = e
    if kind in ("pr-moe", "student", "mos"):
        # the pyramid's lower half has E/2 experts; the student keeps the teacher's top layers' E
        half = args.layers // 2
        experts = tuple(max(1, e // 2) if i < half else e for i in range(args.layers))[args.layers - layers :]
    return TinyLMConfig(
        dim=args.dim,
        num_layers=layers,
        num_experts=experts,
        top_k=2 if kind == "top-2" else 1,
        expert_hidden_dim=args.hidden,
        residual=kind not in ("standard", "top-2"),
        router_options={"aux_loss_coef": 1e-2},
        max_seq_len=args.seq_len,
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    data = load_stdlib_bytes(args.train_bytes)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=max(1, args.steps // 10),
        eval_batches=args.eval_batches,
        seed=args.seed,
    )
    rows: list[dict[str, Any]] = []
    teacher: TinyLM | None = None
    for kind in KINDS:
        mcfg = model_config(args, kind)
        torch.manual_seed(args.seed)
        model = TinyLM(mcfg)
        distiller = None
        if kind == "mos":
            assert teacher is not None
            stop = int(args.kd_stop * args.steps)
            distiller = Distiller(teacher, DistillConfig(stop_step=stop))
        result = train(model, data, cfg, progress=not args.no_progress, desc=kind, distiller=distiller)
        if kind == "pr-moe":
            teacher = model
        total, active = model.param_counts()
        rows.append(
            {
                "model": kind,
                "layers": mcfg.num_layers,
                "experts": "x".join(str(mcfg.layer_experts(i)) for i in range(mcfg.num_layers)),
                "params": total,
                "active_params": active,
                "heldout_loss": round(result.heldout_loss, 4),
                "train_loss": round(result.train_loss, 4),
                "ms_per_step": round(1000 * result.seconds / max(1, args.steps), 1),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| model | layers | experts per layer | params | active params/token | held-out loss | ms/step |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['experts']} | {r['params']:,} | {r['active_params']:,} | "
            f"{r['heldout_loss']:.4f} | {r['ms_per_step']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = run(args)
    print(
        f"tiny LM, dim {args.dim}, expert hidden {args.hidden}, top-1, {args.steps} steps x "
        f"{args.batch_size} x "
        f"{args.seq_len} bytes, {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}"
    )
    print(format_table(rows))
    if args.csv:
        out = Path(_HERE).parent / "bench_out"
        out.mkdir(exist_ok=True)
        harness.write_csv(out / "pr_moe.csv", rows)
    return rows


if __name__ == "__main__":
    main()
