"""Fine-tune a tiny local Llama with plain LoRA, MoLA 2-4-6-8, DynMoLE and MoS at equal budgets (CPU, minutes).

Everything is built here, nothing is downloaded:
  1. a tiny random transformers LlamaForCausalLM (byte-level vocabulary of 256) is pretrained
     for a short while on English prose (the help texts in Python's stdlib pydoc_data/topics.py);
  2. its weights are frozen and each adapter is fine-tuned, from the same base and on the same
     batches, on a new domain: Python source code from the stdlib (held-out loss on other files);
  3. the loss curves and a table (trainable parameters, final train / held-out loss, time) are
     printed, the curves go to bench_out/lora_finetune.png and .csv. The adapters are saved with
     safetensors and one is reloaded into a fresh base model to check the held-out loss is
     restored exactly.

Budgets (all adapters target q/k/v/o/gate/up/down of every layer): MoLA "2-4-6-8" gives the
layer groups 2, 4, 6, 8 rank-8 LoRA experts per adapted linear (top-2 routing); its trainable
count (LoRA experts + routers) is the budget. DynMoLE uses the same allocation with the
Tsallis-entropy hybrid router. Plain LoRA gets the rank whose count is nearest that budget
(rank 42 at the defaults: 5 experts x rank 8 on average, plus ~6% for the routers). "mos" is
Mixture of Shards at rank 64 with its shard pools sized to the same budget; "mos/8" is MoS at
the LoRA rank with the default 8x compression (about 1/8 of the budget).

    python examples/lora_finetune.py                 # 300 + 5 x 150 steps, 1 thread: ~4 min on 2 quiet cores
    python examples/lora_finetune.py --variants lora,mola,dynmole --steps 100 --pretrain-steps 200   # quicker
    python examples/lora_finetune.py --steps 600 --pretrain-steps 400 --variants lora,mola
"""

from __future__ import annotations

import argparse
import csv
import math
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import moe
from moe.lora import apply_lora_moe, find_targets, load_lora_moe, save_lora_moe, trainable_parameters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANT_NAMES = ("lora", "mola", "dynmole", "mos", "mos/8")
MOS_RANK = 64


def read_bytes(files: list[Path], limit: int) -> torch.Tensor:
    """The first `limit` bytes of the concatenated files, as int64 ids [limit]."""
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def corpora(limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(English prose for pretraining, Python train code, Python held-out code) as byte ids."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prose = read_bytes([stdlib / "pydoc_data" / "topics.py"], limit)
    code_files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    held_out = code_files[::10]  # every 10th file: code the adapters never train on
    train = [p for p in code_files if p not in held_out]
    return prose, read_bytes(train, limit), read_bytes(held_out, limit // 4)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """`steps` random windows batches [batch, seq] of `data` (same seed -> same batches)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=g)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def variant_configs(base: nn.Module, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """apply_lora_moe keyword arguments per variant, with LoRA and MoS sized to MoLA's budget."""
    mola = dict(experts_per_layer=args.allocation, rank=args.expert_rank, alpha=2.0 * args.expert_rank)
    probe = build_model(args)
    apply_lora_moe(probe, TARGETS, **mola, router="topk", top_k=2)  # type: ignore[arg-type]
    budget = trainable_parameters(probe)
    per_rank = sum(m.in_features + m.out_features for _, m in find_targets(base, TARGETS))  # LoRA params per rank
    lora_rank = max(1, round(budget / per_rank))
    return {
        "lora": dict(experts_per_layer=1, rank=lora_rank, alpha=2.0 * lora_rank),
        "mola": dict(mola, router="topk", top_k=2),
        "dynmole": dict(mola, router="dynmole"),
        "mos": dict(rank=MOS_RANK, alpha=2.0 * MOS_RANK, router="mos", mos_compression=MOS_RANK * per_rank / budget),
        "mos/8": dict(rank=lora_rank, alpha=2.0 * lora_rank, router="mos", mos_compression=8.0),
    }


@torch.no_grad()
def held_out_loss(model: nn.Module, eval_batches: list[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats/byte) over the batches, in eval mode."""
    model.eval()
    loss = sum(float(model(b, labels=b).loss) for b in eval_batches) / len(eval_batches)
    model.train()
    return loss


def train(
    model: nn.Module,
    train_batches: list[torch.Tensor],
    eval_batches: list[torch.Tensor],
    lr: float,
    eval_every: int,
    desc: str,
    progress: bool = True,
) -> tuple[list[float], list[tuple[int, float]]]:
    """AdamW on the trainable parameters (LM loss + moe.aux_loss); returns (train losses, [(step, held-out)])."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses: list[float] = []
    evals = [(0, held_out_loss(model, eval_batches))]
    bar = tqdm(train_batches, desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    for step, batch in enumerate(bar, 1):
        lm_loss = model(batch, labels=batch).loss
        (lm_loss + moe.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
        if step % eval_every == 0 or step == len(train_batches):
            evals.append((step, held_out_loss(model, eval_batches)))
            bar.set_postfix(train=f"{losses[-1]:.3f}", held_out=f"{evals[-1][1]:.3f}")
    return losses, evals


def mean_tail(values: list[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (shorter windows at the start)."""
    return [mean_tail(values[: i + 1], window) for i in range(len(values))]


def plot(results: dict[str, dict[str, Any]], base_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        curve = smooth(r["losses"])
        ax1.plot(range(1, len(curve) + 1), curve, label=f"{name} ({r['params'] / 1e3:.0f}k params)")
        steps, vals = zip(*r["evals"], strict=True)
        ax2.plot(steps, vals, marker="o", ms=3, label=name)
    ax2.axhline(base_loss, color="gray", ls="--", lw=0.8, label="frozen base")
    ax1.set(xlabel="step", ylabel="train loss (10-step mean)", title="fine-tuning on Python code")
    ax2.set(xlabel="step", ylabel="held-out loss (nats/byte)", title="held-out Python files")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per (variant, step): train loss (10-step mean) and held-out loss where evaluated."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "trainable_params", "step", "train_loss_mean10", "heldout_loss"])
        for name, r in results.items():
            evals = dict(r["evals"])
            curve = smooth(r["losses"])
            for step in range(0, len(curve) + 1):
                train_val = f"{curve[step - 1]:.4f}" if step else ""
                held = f"{evals[step]:.4f}" if step in evals else ""
                if train_val or held:
                    w.writerow([name, r["params"], step, train_val, held])


def print_curves(results: dict[str, dict[str, Any]]) -> None:
    """Held-out loss at every evaluation step, one column per variant."""
    names = list(results)
    steps = sorted({s for r in results.values() for s, _ in r["evals"]})
    print("\nheld-out loss curve (nats/byte)")
    print(f"{'step':>6}" + "".join(f"{n:>10}" for n in names))
    for s in steps:
        row = [dict(results[n]["evals"]).get(s) for n in names]
        print(f"{s:>6}" + "".join(f"{v:>10.3f}" if v is not None else f"{'':>10}" for v in row))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANT_NAMES), help=f"comma list from {list(VARIANT_NAMES)}")
    parser.add_argument("--allocation", default="2-4-6-8", help="MoLA experts per layer group (sets the budget)")
    parser.add_argument("--expert-rank", type=int, default=8, help="rank of each MoLA / DynMoLE expert")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more than the idle cores is many times slower)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.variant_list = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in args.variant_list if n not in VARIANT_NAMES]
    if unknown or not args.variant_list:
        parser.error(f"unknown variants {unknown or args.variants!r}; choose from {list(VARIANT_NAMES)}")
    for name in ("steps", "pretrain_steps", "batch", "seq", "hidden", "layers", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns {"base_loss", "results": {variant: {...}}, "restored", "png"}."""
    args = parse_args(argv)
    progress = not args.no_progress
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, progress)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    prose, code_train, code_held = corpora(limit=2_000_000)
    base = build_model(args)
    n_base = trainable_parameters(base)
    print(f"base: tiny Llama, {args.layers} layers, hidden {args.hidden}, {n_base / 1e6:.2f}M params")
    pre = batches(prose, args.pretrain_steps, args.batch, args.seq, args.seed)
    pre_eval = batches(prose, 2, args.batch, args.seq, args.seed + 1)
    t0 = time.perf_counter()
    pre_losses, _ = train(base, pre, pre_eval, 3e-3, 10**9, "pretrain base (English prose)", progress)
    pre_time = time.perf_counter() - t0
    print(f"pretrained on English prose: loss {pre_losses[0]:.3f} -> {mean_tail(pre_losses):.3f} ({pre_time:.0f} s)")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    train_batches = batches(code_train, args.steps, args.batch, args.seq, args.seed + 2)
    eval_batches = batches(code_held, args.eval_batches, args.batch, args.seq, args.seed + 3)
    base_loss = held_out_loss(base, eval_batches)
    print(f"frozen base on held-out Python code: {base_loss:.3f} nats/byte")
    configs = variant_configs(base, args)
    results: dict[str, dict[str, Any]] = {}
    for name in args.variant_list:
        model = build_model(args)
        model.load_state_dict(base_state)
        apply_lora_moe(model, TARGETS, **configs[name])
        params = trainable_parameters(model)
        t0 = time.perf_counter()
        losses, evals = train(
            model, train_batches, eval_batches, args.lr, args.eval_every, f"fine-tune {name}", progress
        )
        seconds = time.perf_counter() - t0
        results[name] = dict(params=params, losses=losses, evals=evals, seconds=seconds, model=model)
        results[name]["config"] = {k: v for k, v in configs[name].items()}
        save_lora_moe(model, out / f"lora_finetune_{name.replace('/', '_')}.safetensors")

    # reload one adapter into a fresh base: the held-out loss must be restored exactly
    check = next((n for n in ("dynmole", "mola") if n in results), args.variant_list[-1])
    fresh = build_model(args)
    fresh.load_state_dict(base_state)
    load_lora_moe(fresh, out / f"lora_finetune_{check.replace('/', '_')}.safetensors")
    restored = held_out_loss(fresh, eval_batches) == held_out_loss(results[check]["model"], eval_batches)

    print_curves(results)
    ref_name = "mola" if "mola" in results else args.variant_list[0]
    ref = results[ref_name]["params"]
    print(
        f"\n{'variant':<9}{'adapter':<26}{'trainable':>11}{'vs ' + ref_name:>10}{'train loss':>12}"
        f"{'held-out':>10}{'vs base':>9}{'s/step':>8}"
    )
    for name, r in results.items():
        c = r["config"]
        if c.get("router") == "mos":
            desc = f"MoS r{c['rank']} x{c['mos_compression']:.2f} compr."
        elif c["experts_per_layer"] == 1:
            desc = f"LoRA r{c['rank']}"
        else:
            desc = f"{c['experts_per_layer']} x r{c['rank']} {c['router']}"
        held = r["evals"][-1][1]
        print(
            f"{name:<9}{desc:<26}{r['params']:>11,}{r['params'] / ref:>9.2f}x{mean_tail(r['losses']):>12.3f}"
            f"{held:>10.3f}{held - base_loss:>+9.3f}{r['seconds'] / args.steps:>8.3f}"
        )
    print(
        f"(train loss = mean of the last 10 steps; held-out = mean over {args.eval_batches} batches of "
        f"{args.batch}x{args.seq} bytes from unseen files; base model {n_base:,} params, frozen)"
    )
    print(f"adapter reload ({check}) into a fresh base restores the held-out loss exactly: {restored}")
    png, csv_path = out / "lora_finetune.png", out / "lora_finetune.csv"
    plot(results, base_loss, png)
    write_csv(results, csv_path)
    total = time.perf_counter() - t_start
    print(f"plot: {png}   curves: {csv_path}   adapters: {out}/lora_finetune_*.safetensors   total {total:.0f} s")
    if not all(math.isfinite(r["evals"][-1][1]) for r in results.values()):
        raise SystemExit("non-finite held-out loss")
    return {"base_loss": base_loss, "results": results, "restored": restored, "png": png, "csv": csv_path}


if __name__ == "__main__":
    main()
