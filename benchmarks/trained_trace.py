"""Routing traces from a trained MoE LM, for the offload benchmarks (random-init models route unlike real ones).

    python benchmarks/trained_trace.py                    # ~10 min on 2 idle cores; writes the shipped trace
    python benchmarks/trained_trace.py --steps 50 --out /tmp/t.safetensors   # a quick look

Trains examples/tiny_lm.py's byte-level LM scaled to 8 MoE layers x 32 experts, top-4 (top-k
router with the balance loss), on the Python standard library's sources, until its held-out loss
is well below a unigram model's (both printed), then records the routing of held-out text token by
token: per token and layer, the chosen experts, the router probabilities, and the next
--lookahead layers' routers applied to this layer's input (the "router on the current hidden
state" forecast the predictive policy uses). A causal model routes each token of a full-sequence
forward exactly as it would when decoding it one at a time, so the trace is a decode trace.

Routing statistics printed beside the literature's (Fate, arXiv 2502.12224: next-layer recall
~80-90% for Mixtral, ~97% for Qwen1.5-MoE / DeepSeekMoE):
    reuse    fraction of a token's experts at a layer that the previous token also used there
    recall   fraction of a token's experts at layer l+1 that layer l+1's router, applied to the
             token's hidden state at layer l, puts in its top-k
The trace is shipped (benchmarks/data/trained_tinylm_trace.safetensors, ~2 MB); this script
rebuilds it deterministically (fixed seeds; same bytes on the same torch build and thread count).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from tiny_lm import TinyLM, TinyLMConfig, TrainConfig, load_stdlib_bytes, train  # noqa: E402

from moe.offload.predict import route, votes  # noqa: E402
from moe.offload.trace import Trace, TraceBuilder  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "data", "trained_tinylm_trace.safetensors")
MODEL = TinyLMConfig(dim=96, num_layers=8, num_heads=4, num_experts=32, top_k=4, expert_hidden_dim=64, max_seq_len=128)


def unigram_loss(train_bytes: torch.Tensor, heldout_bytes: torch.Tensor) -> float:
    """Cross-entropy (nats/byte) of held-out bytes under the train bytes' add-one unigram model."""
    counts = torch.bincount(train_bytes.long(), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout_bytes.long()].mean())


@torch.no_grad()
def record(model: TinyLM, text: torch.Tensor, windows: int, lookahead: int) -> tuple[Trace, dict[str, float]]:
    """Routing of `windows` consecutive held-out windows of max_seq_len bytes, token by token."""
    model.eval()
    layers = model.moe_layers()
    routers = [layer.router for layer in layers]
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for m in layers]
    s = model.config.max_seq_len
    builder = TraceBuilder(len(layers), MODEL.num_experts, lookahead)
    reuse, recall = [], []
    try:
        for w in range(windows):
            inputs.clear()
            model(text[w * s : (w + 1) * s].long().unsqueeze(0))
            xs = [x.reshape(-1, x.shape[-1]) for x in inputs]  # [S, D] per layer
            routed = [route(r, x) for r, x in zip(routers, xs, strict=True)]
            for t in range(s):
                for layer in range(len(layers)):
                    probs, ids = routed[layer]  # type: ignore[misc]
                    chosen = ids[t].tolist()
                    ahead = []
                    for j in range(1, lookahead + 1):
                        if layer + j < len(layers):
                            p, i = route(routers[layer + j], xs[layer][t : t + 1])  # type: ignore[misc]
                            ahead.append((layer + j, votes(p, i)))
                            if j == 1:
                                truth = set(routed[layer + 1][1][t].tolist())  # type: ignore[index]
                                recall.append(len(truth & set(i[0].tolist())) / len(truth))
                    if t > 0:
                        reuse.append(len(set(chosen) & set(ids[t - 1].tolist())) / len(chosen))
                    builder.add(layer, chosen, probs[t], ahead)
    finally:
        for h in hooks:
            h.remove()
    stats = {"reuse": sum(reuse) / len(reuse), "next_layer_recall": sum(recall) / len(recall)}
    return builder.build(expert_bytes=1), stats


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 128 bytes to record")
    p.add_argument("--lookahead", type=int, default=2, help="later layers' routers applied to each hidden state")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.steps < 1 or args.windows < 1 or args.lookahead < 0:
        p.error("--steps and --windows must be >= 1, --lookahead >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_stdlib_bytes()
    model = TinyLM(MODEL)
    cfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=MODEL.max_seq_len, lr=3e-3, warmup=50, eval_batches=16)
    start = time.perf_counter()
    result = train(model, data, cfg)
    unigram = unigram_loss(data.train, data.heldout)
    if args.windows * MODEL.max_seq_len > data.heldout.numel():
        p.error(f"--windows {args.windows} needs more held-out text than the {data.heldout.numel()} bytes loaded")
    trace, stats = record(model, data.heldout, args.windows, args.lookahead)
    trace.source = (
        f"trained tiny LM ({MODEL.num_layers} MoE layers x {MODEL.num_experts} experts, top-{MODEL.top_k}, "
        f"{args.steps} steps): held-out {result.heldout_loss:.3f} nats/byte vs unigram {unigram:.3f}; "
        f"{args.windows} held-out windows of {MODEL.max_seq_len} bytes"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    trace.save(args.out)
    out = {"heldout_loss": result.heldout_loss, "unigram_loss": unigram, **stats}
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f}s")
    bits = unigram / math.log(2)
    print(f"held-out loss {result.heldout_loss:.3f} nats/byte, unigram {unigram:.3f} ({bits:.2f} bits)")
    print(f"routing: next-token reuse {stats['reuse']:.3f}, next-layer recall {stats['next_layer_recall']:.3f}")
    print("  (Fate, arXiv 2502.12224: next-layer recall ~0.80-0.90 Mixtral, ~0.97 Qwen1.5-MoE / DeepSeekMoE)")
    print(f"wrote {args.out}: {trace.num_steps} steps, {os.path.getsize(args.out) / 1e6:.2f} MB")
    return out


if __name__ == "__main__":
    main()
