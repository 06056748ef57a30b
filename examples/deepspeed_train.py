"""Train the tiny MoE LM (examples/tiny_lm.py) with DeepSpeed: ZeRO 2 + expert parallelism.

    deepspeed --num_gpus 2 examples/deepspeed_train.py            # 2 ranks (CPU: gloo), ep_size 2
    torchrun --nproc_per_node 2 examples/deepspeed_train.py       # the same with torchrun
    deepspeed --num_gpus 2 examples/deepspeed_train.py --steps 300 --experts 16 --save-dir ckpt
    torchrun --nproc_per_node 2 examples/deepspeed_train.py --ep-size 1 --resume ckpt --weights-only

Defaults (2 layers, 8 experts, 200 steps) finish in about a minute on 2 CPU cores. Settings
are in examples/ds_config.json (AdamW via torch_adam, so nothing is JIT-compiled; on GPUs
drop "torch_adam" for DeepSpeed's fused Adam and add "bf16": {"enabled": true}).

The whole recipe for any model with moe.MoE layers:

    engine, *_ = moe_ds.initialize(model, "ds_config.json", ep_size=2)   # prepare + initialize + check
    loss = cross_entropy + moe.aux_loss(engine.module)
    engine.backward(loss); engine.step(); moe.update_routers(engine.module)
    engine.save_checkpoint(dir)                         # experts stored by global id
    moe_ds.export_safetensors(engine, "model.safetensors")   # plain file, any EP size or none
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import deepspeed  # noqa: E402
from tiny_lm import TinyLM, TinyLMConfig, lm_loss, load_stdlib_bytes, sample_batch  # noqa: E402

import moe  # noqa: E402
from moe.integrations import deepspeed as moe_ds  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny MoE LM with DeepSpeed (ZeRO + expert parallelism).")
    p.add_argument("--config", default=str(HERE / "ds_config.json"), help="DeepSpeed config JSON")
    p.add_argument("--ep-size", type=int, default=2, help="expert-parallel size (divides world size and --experts)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--router", choices=("topk", "aux_free"), default="topk")
    p.add_argument("--train-bytes", type=int, default=1_000_000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-dir", default=None, help="engine.save_checkpoint directory (off by default)")
    p.add_argument("--export", default=None, help="write the trained model to this .safetensors file")
    p.add_argument("--resume", default=None, help="engine.load_checkpoint directory to start from")
    p.add_argument(
        "--weights-only", action="store_true", help="with --resume: module weights only (another EP or world size)"
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Trains; returns the final held-out loss (the same on every rank)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
        moe_ds.skip_cpu_comm_build()  # its shared-memory op would JIT-compile for ~2 min; gloo suffices
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank (prepare shards rank 0's experts)
    cfg = TinyLMConfig(
        dim=args.dim,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden_dim=args.dim,
        router=args.router,
        max_seq_len=args.seq_len,
    )
    model = TinyLM(cfg)
    engine, _, _, _ = moe_ds.initialize(model, args.config, ep_size=args.ep_size)
    batch_size = engine.train_micro_batch_size_per_gpu()
    if args.resume:  # experts are stored by global id, so --weights-only loads at any ep_size
        path, _ = engine.load_checkpoint(
            args.resume, load_optimizer_states=not args.weights_only, load_module_only=args.weights_only
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (with a 'latest' file) under {args.resume}")
        if rank == 0:
            print(f"resumed from {path}", flush=True)
    if rank == 0:
        params = sum(p.numel() for p in engine.module.parameters())
        print(
            f"world {world}, ep_size {args.ep_size}, ZeRO stage {engine.zero_optimization_stage()}, "
            f"{params} parameters on rank 0 (its share of the experts)",
            flush=True,
        )

    data = load_stdlib_bytes(args.train_bytes)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank reads different batches
    start = time.perf_counter()
    for step in range(args.steps):
        batch = sample_batch(data.train, batch_size, args.seq_len, gen).to(engine.device)
        loss = lm_loss(engine, batch)
        engine.backward(loss + moe.aux_loss(engine.module))
        engine.step()
        moe.update_routers(engine.module)
        if step % args.log_every == 0 or step == args.steps - 1:
            mean = _mean(loss.detach())
            vio = engine.module.max_violation()
            if rank == 0:
                print(
                    f"step {step:4d}  loss {mean:.3f}  MaxVio {vio:.2f}  {time.perf_counter() - start:.1f}s", flush=True
                )

    heldout = _heldout_loss(engine, data.heldout, batch_size, args.seq_len)
    if rank == 0:
        print(f"held-out loss {heldout:.3f} (uniform bytes: {torch.log(torch.tensor(256.0)):.3f})", flush=True)
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
        if rank == 0:
            print(f"checkpoint: {args.save_dir} (experts as layer_<l>_expert_<global id> files)", flush=True)
    if args.export:
        moe_ds.export_safetensors(engine, args.export)
        if rank == 0:
            print(f"exported {args.export}: load with moe.parallel.load_checkpoint at any EP size", flush=True)
    return heldout


def _mean(x: torch.Tensor) -> float:
    x = x.float().clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


@torch.no_grad()
def _heldout_loss(engine: deepspeed.DeepSpeedEngine, stream: torch.Tensor, batch_size: int, seq_len: int) -> float:
    engine.eval()
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())
    losses = [
        _mean(lm_loss(engine, sample_batch(stream, batch_size, seq_len, gen).to(engine.device))) for _ in range(4)
    ]
    engine.train()
    return sum(losses) / len(losses)


if __name__ == "__main__":
    main()
