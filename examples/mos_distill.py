"""Mixture-of-Students on the tiny LM: distil a PR-MoE teacher into a shallower PR-MoE student (CPU).

DeepSpeed-MoE's recipe (Rajbhandari et al., 2022, section 4): train a PR-MoE teacher (Residual MoE
layers, more experts in later layers), then train a student with fewer layers on the language
modelling loss plus a KD term against the teacher's logits, and switch the KD term off part way
through training (staged KD). This script trains the teacher, then the same student twice on the
same batches, without and with staged KD, and prints the held-out losses.

    python examples/mos_distill.py                       # a few CPU minutes
    python examples/mos_distill.py --steps 100 --kd-stop 60

The KD part of the loop (moe.distill):

    distiller = Distiller(teacher, DistillConfig(temperature=1.0, stop_step=kd_stop))
    loss = cross_entropy + moe.aux_loss(student) + distiller.term(step, student_logits, inputs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_lm import TinyLM, TinyLMConfig, TrainConfig, load_stdlib_bytes, train  # noqa: E402

from moe.distill import DistillConfig, Distiller  # noqa: E402


def pyramid(layers: int, low: int, high: int) -> tuple[int, ...]:
    """Expert counts of a PR-MoE pyramid: the first half of the layers `low`, the rest `high`."""
    return tuple(low if i < layers // 2 else high for i in range(layers))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mixture-of-Students: staged KD of a PR-MoE teacher into a student.")
    p.add_argument("--steps", type=int, default=200, help="training steps of the teacher and of each student")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--experts", type=int, nargs=2, default=[4, 8], metavar=("LOW", "HIGH"), help="pyramid")
    p.add_argument("--top-k", type=int, default=1, help="experts per token (PR-MoE: 1 expert + the dense branch)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kd-stop", type=int, default=None, help="step the KD term stops at (default: 3/4 of --steps)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-bytes", type=int, default=2_000_000)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_stdlib_bytes(args.train_bytes)
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=max(1, args.steps // 10),
        eval_batches=args.eval_batches,
        seed=args.seed,
    )
    low, high = args.experts

    def model(layers: int) -> TinyLM:
        torch.manual_seed(args.seed)
        cfg = TinyLMConfig(
            dim=args.dim,
            num_layers=layers,
            num_experts=pyramid(layers, low, high),
            top_k=args.top_k,
            expert_hidden_dim=args.dim,
            residual=True,
            max_seq_len=args.seq_len,
        )
        return TinyLM(cfg)

    progress = not args.no_progress
    teacher = model(args.teacher_layers)
    t = train(teacher, data, train_cfg, progress=progress, desc="teacher")
    plain = train(model(args.student_layers), data, train_cfg, progress=progress, desc="student")
    stop = args.kd_stop if args.kd_stop is not None else (3 * args.steps) // 4
    distiller = Distiller(teacher, DistillConfig(weight=args.kd_weight, temperature=args.temperature, stop_step=stop))
    kd = train(model(args.student_layers), data, train_cfg, progress=progress, desc="student+KD", distiller=distiller)
    out = {"teacher": t.heldout_loss, "student": plain.heldout_loss, "student_kd": kd.heldout_loss}
    print(f"held-out loss after {args.steps} steps (bytes, nats/byte):")
    print(f"  teacher  PR-MoE {args.teacher_layers} layers          {t.heldout_loss:.4f}")
    print(f"  student  PR-MoE {args.student_layers} layers, no KD    {plain.heldout_loss:.4f}")
    print(f"  student  PR-MoE {args.student_layers} layers, KD < {stop}  {kd.heldout_loss:.4f}")
    return out


if __name__ == "__main__":
    main()
