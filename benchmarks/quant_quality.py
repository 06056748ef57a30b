"""Quality of quantized experts (issue 19): held-out loss and greedy-token agreement against the
unquantized model, for int8 and int4 (targets: int8 greedy tokens identical on the test prompts;
int4 held-out loss within +2% of fp32).

    python benchmarks/quant_quality.py                 # ~4 min on 2 shared cores
    python benchmarks/quant_quality.py --steps 30 --hf-steps 30 --prompts 2   # a quick look

Two models, both trained here on real text (the Python standard library's sources, bytes; held-out
files never seen in training), with fixed seeds:
    tiny LM   examples/tiny_lm.py's TinyLM (4 MoE layers x 8 experts, top-2, D = 64, H = 64),
              quantized in memory: every layer's experts become moe.quant.QuantizedExperts.
    HF        a tiny transformers Mixtral (4 layers x 8 experts, top-2, hidden 64, intermediate
              64, byte vocabulary) trained with its own loss, saved with save_pretrained and run
              through moe.offload.load(..., expert_quant=...) end to end: quantized while loading,
              quantized bytes in every tier, dequantized (fused on CPU) at use.
    mixed     the same HF model, full precision, with HOBBIT-style mixed-precision misses
              (OffloadConfig(miss_quant="int4"): a miss runs from an int4 copy while the full copy is
              fetched) at a cache of --mixed-cache of the experts per layer, LRU.
Per scheme: held-out loss (nats/byte, the same fixed batches for every scheme) and its change
against fp32; greedy decoding of --new-tokens bytes after each of --prompts held-out prompts of
32 bytes: prompts whose continuation is identical, and the fraction of positions that agree.
Writes bench_out/quant_quality.csv.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, os.path.join(_HERE, "..", "examples"))
if _HERE not in sys.path:
    sys.path.append(_HERE)

import bench_harness as harness  # noqa: E402
from tiny_lm import TinyLM, TinyLMConfig, TrainConfig, evaluate, load_stdlib_bytes, sample_batch, train  # noqa: E402

from moe.quant import QuantizedExperts  # noqa: E402

SCHEMES: tuple[str | None, ...] = (None, "int8", "int4")
TINY = TinyLMConfig(dim=64, num_layers=4, num_heads=4, num_experts=8, top_k=2, expert_hidden_dim=64, max_seq_len=64)
SEQ = 64  # training and held-out windows (bytes)
PROMPT_LEN = 32


def prompts(heldout: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n held-out prompts [1, PROMPT_LEN], evenly spaced through the held-out stream."""
    step = (heldout.numel() - PROMPT_LEN) // n
    return [heldout[i * step : i * step + PROMPT_LEN].long().unsqueeze(0) for i in range(n)]


@torch.no_grad()
def greedy(logits_of: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, new: int) -> list[int]:
    ids = prompt
    for _ in range(new):
        nxt = logits_of(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, float]:
    """(prompts with an identical continuation, fraction of positions that agree)."""
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    pos = sum(x == y for a, b in zip(ref, got, strict=True) for x, y in zip(a, b, strict=True))
    return same, pos / sum(len(a) for a in ref)


def report(
    rows: list[dict[str, Any]], model: str, scheme: str | None, loss: float, base: float, tokens: list[list[int]],
    ref: list[list[int]], group: int,
) -> None:  # fmt: skip
    same, frac = agreement(ref, tokens)
    name = scheme or "fp32"
    print(
        f"{model:>8} {name:>5} {group if scheme == 'int4' else '':>5} {loss:10.4f} {100 * (loss / base - 1):+8.2f}% "
        f"{same:>4}/{len(ref):<4} {frac:9.3f}"
    )
    rows.append(
        dict(model=model, scheme=name, group_size=group if scheme == "int4" else "", heldout_loss=round(loss, 5),
             loss_change_pct=round(100 * (loss / base - 1), 3), identical_prompts=same, prompts=len(ref),
             token_agreement=round(frac, 4))
    )  # fmt: skip


def tiny_lm_part(args: argparse.Namespace, data: Any, rows: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    model = TinyLM(TINY)
    cfg = TrainConfig(steps=args.steps, batch_size=16, seq_len=SEQ, lr=3e-3, warmup=30, eval_batches=32)
    start = time.perf_counter()
    result = train(model, data, cfg, progress=False)
    print(f"\ntiny LM: trained {args.steps} steps in {time.perf_counter() - start:.0f}s")
    model.eval()
    tests = prompts(data.heldout, args.prompts)

    def run(m: TinyLM) -> tuple[float, list[list[int]]]:
        loss = evaluate(m, data.heldout, cfg)[0]
        return loss, [greedy(m, p, args.new_tokens) for p in tests]

    base, ref = run(model)
    assert abs(base - result.heldout_loss) < 1e-4
    for scheme in SCHEMES:
        for group in args.groups if scheme == "int4" else [64]:
            q = copy.deepcopy(model)
            if scheme is not None:
                for layer in q.moe_layers():
                    layer.experts = QuantizedExperts.from_experts(layer.experts, scheme, group)
            loss, tokens = (base, ref) if scheme is None else run(q)
            report(rows, "tiny LM", scheme, loss, base, tokens, ref, group)


def build_hf(steps: int, data: Any, path: str) -> None:
    """A tiny Mixtral trained on the byte stream with its own loss, saved to `path`."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sample_batch(data.train, 16, SEQ, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"\nHF Mixtral: trained {steps} steps in {time.perf_counter() - start:.0f}s (last loss {loss.item():.3f})")
    model.eval().save_pretrained(path)


def hf_eval(path: str, cfg: Any, batches: list[torch.Tensor], tests: list[torch.Tensor], new: int) -> tuple:
    """(held-out loss, greedy continuations, the OffloadRuntime) of the model at `path` offloaded with `cfg`."""
    import warnings

    import moe.offload as mo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the matmul path is printed instead
        om = mo.load(path, "cpu", config=cfg)
    with torch.no_grad():
        loss = sum(float(om.model(input_ids=b, labels=b).loss) for b in batches) / len(batches)
        tokens = [
            om.model.generate(p, max_new_tokens=new, do_sample=False, min_new_tokens=new)[0, PROMPT_LEN:].tolist()
            for p in tests
        ]
    om.close()
    return loss, tokens, om.runtime


def hf_part(args: argparse.Namespace, data: Any, rows: list[dict[str, Any]]) -> None:
    import moe.offload as mo

    tmp = tempfile.TemporaryDirectory()
    path = args.hf_dir or os.path.join(tmp.name, "tiny-mixtral")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_hf(args.hf_steps, data, path)
    tests = prompts(data.heldout, args.prompts)
    gen = torch.Generator().manual_seed(1234)
    batches = [sample_batch(data.heldout, 16, SEQ, gen) for _ in range(32)]
    full = mo.OffloadConfig(expert_cache_bytes=1 << 30)
    base, ref, _ = hf_eval(path, full, batches, tests, args.new_tokens)
    report(rows, "HF", None, base, base, ref, ref, 64)
    if "hf" in args.parts:
        for scheme in SCHEMES[1:]:
            for group in args.groups if scheme == "int4" else [64]:
                cfg = dataclasses.replace(full, expert_quant=scheme, expert_quant_group_size=group)
                loss, tokens, rt = hf_eval(path, cfg, batches, tests, args.new_tokens)
                print(f"         ({scheme}: experts {rt.store.expert_bytes(0)} bytes, {rt.quant_paths})")
                report(rows, "HF", scheme, loss, base, tokens, ref, group)
    if "mixed" in args.parts:
        per_layer = max(1, round(args.mixed_cache * 8))
        expert_bytes = 3 * 64 * 64 * 4  # fp32 expert of the tiny Mixtral
        cfg = mo.OffloadConfig(expert_cache_bytes=per_layer * 4 * expert_bytes, miss_quant="int4")
        loss, tokens, rt = hf_eval(path, cfg, batches, tests, args.new_tokens)
        st = rt.stats
        low = st.cpu_misses / max(st.requests, 1)
        print(f"         (mixed: {per_layer} of 8 experts cached per layer; {low:.1%} of expert uses ran in int4)")
        report(rows, f"HF mixed {per_layer}/8", "int4", loss, base, tokens, ref, 64)
        rows[-1]["low_precision_uses"] = round(low, 4)
    tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="tiny LM training steps")
    p.add_argument("--hf-steps", type=int, default=300, help="HF Mixtral training steps")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--groups", nargs="*", type=int, default=[32, 64], help="int4 group sizes (dividing 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", nargs="*", default=["tiny", "hf", "mixed"], choices=["tiny", "hf", "mixed"])
    p.add_argument("--mixed-cache", type=float, default=0.25, help="mixed: fraction of each layer's experts cached")
    p.add_argument("--hf-dir", help="where the trained HF model is saved (reused when present; default: a temp dir)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_stdlib_bytes()
    rows: list[dict[str, Any]] = []
    print(f"{'model':>8} {'quant':>5} {'group':>5} {'held-out':>10} {'change':>9} {'same':>9} {'agree':>9}")
    if "tiny" in args.parts:
        tiny_lm_part(args, data, rows)
    if "hf" in args.parts or "mixed" in args.parts:
        hf_part(args, data, rows)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "quant_quality.csv")
    harness.write_csv(out, rows, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
