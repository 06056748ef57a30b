"""Quickstart: train a tiny MoE transformer LM on the Python standard library's sources (CPU).

What `make demo` runs. A 2-layer byte-level transformer whose MLPs are `moe.MoE` layers
(16 experts, top-2) trains for a few hundred steps; it prints the training loss and MaxVio
(load imbalance: 0 = every expert gets the same number of tokens), then the held-out loss.

    python examples/quickstart.py                       # aux-loss-free router, 400 steps
    python examples/quickstart.py --router topk --aux-loss-coef 1e-2
    python examples/quickstart.py --router recurrent --steps 200

The loop is the whole recipe for any model with moe.MoE layers:

    loss = cross_entropy + moe.aux_loss(model)   # weighted balance losses, if the router has any
    loss.backward(); optimizer.step()
    moe.update_routers(model)                    # aux-free bias update after each step
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_lm import CAUSAL_ROUTERS, TinyLM, TinyLMConfig, TrainConfig, TrainResult, load_stdlib_bytes, train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny MoE LM on stdlib sources.")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--router", choices=CAUSAL_ROUTERS, default="aux_free")
    p.add_argument("--aux-loss-coef", type=float, default=1e-2, help="topk / recurrent balance-loss weight")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux_free bias step gamma")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-bytes", type=int, default=4_000_000, help="bytes of stdlib source to train on")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: 2 threads ran 13-24x slower on a loaded 2-core box)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def router_options(args: argparse.Namespace) -> dict[str, float]:
    if args.router == "aux_free":
        return {"bias_update_rate": args.bias_update_rate}
    if args.router == "recurrent":
        return {"aux_loss_coef": args.aux_loss_coef, "recurrent_dim": args.dim}
    return {"aux_loss_coef": args.aux_loss_coef}


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_stdlib_bytes(args.train_bytes)
    model = TinyLM(
        TinyLMConfig(
            dim=args.dim,
            num_layers=args.layers,
            num_experts=args.experts,
            top_k=args.top_k,
            router=args.router,
            router_options=router_options(args),
            max_seq_len=args.seq_len,
        )
    )
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=min(20, max(1, args.steps // 10)),
        eval_batches=args.eval_batches,
        maxvio_window=min(50, args.steps),
        seed=args.seed,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"data: {data.train.numel() / 1e6:.1f} MB train ({data.num_train_files} stdlib files), "
        f"{data.heldout.numel() / 1e6:.2f} MB held out ({data.num_heldout_files} files)"
    )
    print(
        f"model: {args.layers} layers, dim {args.dim}, {args.experts} experts top-{args.top_k}, "
        f"router {args.router} {router_options(args)}, {n_params / 1e6:.2f}M params"
    )

    from tqdm import tqdm

    def log(step: int, loss: float, max_vio: float) -> None:
        if (step + 1) % args.log_every == 0 or step == 0:
            tqdm.write(f"step {step + 1:4d}  loss {loss:.3f}  MaxVio {max_vio:.2f}")

    result = train(model, data, cfg, progress=not args.no_progress, desc=f"quickstart ({args.router})", on_step=log)
    loads = [layer.stats.tokens_per_expert.tolist() for layer in model.moe_layers()]
    print(
        f"done in {result.seconds:.0f} s ({1e3 * result.seconds / max(1, args.steps):.0f} ms/step): "
        f"train loss {result.train_loss:.3f}, held-out loss {result.heldout_loss:.3f} "
        f"(uniform bytes: {torch.log(torch.tensor(256.0)):.2f}), "
        f"MaxVio {result.max_vio:.2f} (last {cfg.maxvio_window} steps), held-out MaxVio {result.heldout_max_vio:.2f}"
    )
    print(f"tokens per expert, last batch, layer 0: {loads[0]}")
    return result


if __name__ == "__main__":
    main()
