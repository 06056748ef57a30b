"""Page faults and peak resident memory of CPU training steps of one MoE layer (issue 21).

    python benchmarks/step_memory.py [--config standard|fine|small] [--steps 5] [--optimizer none|adamw]
        [--pool-limit BYTES] [--keep-freed-memory] [--threads 2]

Runs --steps forward + backward steps (grads set to None after each, as the benchmark does, or
after an AdamW step) and prints per step the minor page faults (each is a 4 KiB page of a buffer
allocated fresh from the OS and touched) and the buffers the C++ ops' pool allocated fresh; then
the median step time and the process's peak RSS. Counts do not depend on the machine's load, the
time does. Peak RSS is per process: run one configuration per process to compare (as below).
--pool-limit 0 turns the pool's reuse off (every output allocated fresh, as before issue 21).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
from moe_layer import CONFIGS  # noqa: E402  (the shapes of benchmarks/moe_layer.py)

import moe  # noqa: E402
from moe.cpu_memory import buffer_pool_stats, set_buffer_pool_limit  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(config: str, steps: int, optimizer: str, tokens: int | None = None) -> list[dict[str, float]]:
    """One row per step: faults, fresh pool buffers, seconds."""
    shape = CONFIGS[config]
    torch.manual_seed(0)
    layer = moe.MoE(shape.dim, shape.hidden, shape.experts, shape.top_k)
    x = torch.randn(1, tokens or shape.tokens, shape.dim, requires_grad=True)
    dy = torch.randn_like(x)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4) if optimizer == "adamw" else None
    rows = []
    for _ in range(steps):
        stats = buffer_pool_stats()
        fresh0, faults0, t0 = stats.fresh if stats else 0, _faults(), time.perf_counter()
        layer(x).backward(dy)
        if opt is not None:
            opt.step()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        seconds, stats = time.perf_counter() - t0, buffer_pool_stats()
        rows.append({"faults": _faults() - faults0, "fresh": (stats.fresh if stats else 0) - fresh0, "s": seconds})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="standard")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", choices=("none", "adamw"), default="none")
    parser.add_argument("--pool-limit", type=int, default=None, help="bytes; 0 = no reuse; default: the pool's")
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="override T (smoke runs)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the first step warms up), got {args.steps}")
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        moe.keep_freed_memory()
    set_buffer_pool_limit(args.pool_limit)
    rows = run(args.config, args.steps, args.optimizer, args.tokens)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        f"{args.config} optimizer={args.optimizer} pool_limit={args.pool_limit} keep={args.keep_freed_memory}: "
        f"faults/step {[int(r['faults']) for r in rows]}, fresh pool buffers/step {[int(r['fresh']) for r in rows]}, "
        f"median step {1e3 * statistics.median(r['s'] for r in rows[1:]):.0f} ms, peak RSS {peak_mib:.0f} MiB"
    )
    return rows


if __name__ == "__main__":
    main()
