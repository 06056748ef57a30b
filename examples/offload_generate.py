"""Generate text from a Hugging Face MoE checkpoint with its experts offloaded (moe.offload).

    python examples/offload_generate.py --model DIR --device cuda --expert-cache-gb 8 --policy predictive \
        --prompt "The capital of France is"
    python examples/offload_generate.py            # no --model: a small random Mixtral, saved first
    python examples/offload_generate.py --family gpt_oss --tiny --check   # any supported family; --check
                                                   # compares the tokens with the model fully in memory

Attention, embeddings and routers sit on --device; routed experts stream from the safetensors
shards through RAM into a device cache of --expert-cache-gb. Ends with tokens/s, hit rate, bytes
moved, misses computed on the CPU, Belady's hit rate on the same routing trace, and the measured
ms/token beside the decode timeline's (moe.offload.timeline) for the policies on the same routing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import moe.offload as mo

# Routed-expert options per family (transformers model_type), for a random model of width D.
# Every family moe.integrations.transformers.patch supports; the DeepSeek-style ones keep layer 0 dense.
# DeepSeek attention (MLA: as many key/value heads as query heads)
_MLA = dict(
    q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, head_dim=16
)
_GROUPED = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1)


def family_options(family: str, dim: int, layers: int) -> dict[str, object]:
    """config kwargs (beyond the common sizes) of a random `family` model with 16 experts of width dim."""
    moe_width = dict(moe_intermediate_size=dim, intermediate_size=2 * dim)
    families: dict[str, dict[str, object]] = {
        "mixtral": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=2 * dim),
        "qwen2_moe": dict(
            num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=2 * dim, **moe_width
        ),  # fmt: skip
        "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, **moe_width),
        "olmoe": dict(num_experts=16, num_experts_per_tok=2, intermediate_size=dim),
        "deepseek_v3": dict(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            kv_lora_rank=dim // 4,
            **_GROUPED,
            **_MLA,
            **moe_width,
        ),  # fmt: skip
        "deepseek_v2": dict(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            routed_scaling_factor=2.0,
            first_k_dense_replace=1,
            kv_lora_rank=dim // 4,
            **_MLA,
            **moe_width,
        ),  # fmt: skip
        "glm4_moe": dict(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, **_GROUPED, **moe_width),
        "dots1": dict(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, **_GROUPED, **moe_width),
        "minimax": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=2 * dim),
        "qwen3_next": dict(
            num_experts=16,
            num_experts_per_tok=4,
            shared_expert_intermediate_size=2 * dim,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            **moe_width,
        ),  # fmt: skip
        "jamba": dict(
            num_experts=16,
            num_experts_per_tok=2,
            intermediate_size=2 * dim,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=8,
            use_mamba_kernels=False,
        ),  # fmt: skip
        "granitemoe": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=dim),
        "granitemoeshared": dict(
            num_local_experts=16, num_experts_per_tok=2, intermediate_size=dim, shared_intermediate_size=2 * dim
        ),  # fmt: skip
        "phimoe": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=2 * dim),
        "gpt_oss": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=2 * dim),
        "exaone_moe": dict(num_experts=16, num_experts_per_tok=4, num_shared_experts=1, **_GROUPED, **moe_width),
        "minicpm5_moe": dict(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            **_GROUPED,
            **moe_width,
            mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
        ),  # fmt: skip
        "solar_open": dict(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, **_GROUPED, **moe_width),
        "mellum": dict(num_experts=16, num_experts_per_tok=4, **moe_width),
        "minimax_m2": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=2 * dim),
        "granitemoe_swa": dict(num_local_experts=16, num_experts_per_tok=2, intermediate_size=dim),
        "granitemoehybrid": dict(
            num_local_experts=16,
            num_experts_per_tok=2,
            intermediate_size=dim,
            shared_intermediate_size=2 * dim,
            mamba_n_heads=4,
            mamba_d_head=dim // 2,
            mamba_expand=2,
            mamba_n_groups=1,
            mamba_d_state=8,
            layer_types=["mamba" if i % 2 == 0 else "attention" for i in range(layers)],
        ),  # fmt: skip
        "ernie4_5_moe": dict(
            num_experts=16, num_experts_per_tok=4, moe_num_shared_experts=1, moe_layer_start_index=1, **moe_width
        ),  # fmt: skip
        "qwen3_5_moe_text": dict(
            num_experts=16,
            num_experts_per_tok=4,
            shared_expert_intermediate_size=2 * dim,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            **moe_width,
        ),  # fmt: skip
    }
    if family not in families:
        raise SystemExit(f"--family must be one of {sorted(families)}, got {family!r}")
    return families[family]


FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe", "dots1", "minimax",
    "qwen3_next", "jamba", "granitemoe", "granitemoeshared", "phimoe", "gpt_oss", "exaone_moe", "minicpm5_moe",
    "solar_open", "mellum", "minimax_m2", "granitemoe_swa", "qwen3_5_moe_text",
    "granitemoehybrid", "ernie4_5_moe",
)  # fmt: skip


def build_random_model(path: str, family: str, seed: int = 0, tiny: bool = False) -> None:
    """A small random MoE model (byte-level vocab) saved with save_pretrained.

    tiny=True: D = 32, 3 layers and a wider weight init (decisive routing, so the offloaded and
    in-memory models cannot pick different experts on an fp32 near-tie), for fast checks.
    """
    import transformers

    torch.manual_seed(seed)
    dim, layers = (32, 3) if tiny else (256, 8)
    common = dict(
        vocab_size=256, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512,
    )  # fmt: skip
    if tiny:
        common.update(initializer_range=0.2, head_dim=dim // 4)
    cfg = transformers.AutoConfig.for_model(family, **{**common, **family_options(family, dim, layers)})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


class ByteStreamer:
    """Prints generated byte-level tokens as they come (the generate() streamer protocol)."""

    def __init__(self, prompt_len: int) -> None:
        self.skip = prompt_len
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:
            self.skip = max(0, self.skip - len(ids))
            return
        self.tokens += len(ids)
        sys.stdout.write(bytes(i % 256 for i in ids).decode("utf-8", errors="replace"))
        sys.stdout.flush()

    def end(self) -> None:
        sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="transformers model directory (config.json + safetensors)")
    p.add_argument(
        "--family", default="mixtral", choices=FAMILIES, help="random model family when --model is not given"
    )
    p.add_argument("--tiny", action="store_true", help="with --family: a 3-layer D=32 model (fast checks)")
    p.add_argument(
        "--check", action="store_true", help="also generate with the model fully in memory and compare the tokens"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-cache-gb", type=float, help="device GiB for experts (default: 25%% of all experts)")
    p.add_argument("--ram-cache-gb", type=float, help="RAM tier GiB (default: unlimited; 0 streams from disk)")
    # LRU by default: the fastest policy measured (H200 and CPU, BENCHMARKS.md): at batch 1 the
    # predictive policy's forecast costs the host more time than its prefetches save.
    p.add_argument("--policy", default="lru", choices=["lru", "lfu", "predictive"])
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--lookahead", type=int, default=1)
    p.add_argument("--miss", default="auto", choices=["auto", "copy", "cpu"])
    p.add_argument("--prompt", default="Mixture-of-experts models route each token to")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the config's")
    p.add_argument("--trace-out", help="write the routing trace (.safetensors) for benchmarks/offload.py")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = os.path.join(tmp.name, "random-moe")
        print(f"no --model: building a random {args.family} model in {model_dir}", file=sys.stderr)
        build_random_model(model_dir, args.family, tiny=args.tiny)

    total_experts, expert_bytes, layers = _expert_sizes(model_dir)
    budget = (
        int(args.expert_cache_gb * (1 << 30))
        if args.expert_cache_gb is not None
        else max(1, total_experts // 4) * expert_bytes
    )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    ram = None if args.ram_cache_gb is None else int(args.ram_cache_gb * (1 << 30))
    start = time.perf_counter()
    config = mo.OffloadConfig(
        expert_cache_bytes=budget, policy=args.policy, scope=args.scope, lookahead=args.lookahead, miss=args.miss,
        ram_cache_bytes=ram, record_trace=True,  # for Belady on the same trace
    )  # fmt: skip
    om = mo.load(model_dir, args.device, config=config, dtype=dtype, progress=True)
    print(f"loaded in {time.perf_counter() - start:.1f}s; expert cache {budget / 2**20:.1f} MiB", file=sys.stderr)

    tokenizer = _tokenizer(model_dir)
    if tokenizer is not None:
        from transformers import TextStreamer

        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        streamer: object = TextStreamer(tokenizer, skip_prompt=True)
    else:
        vocab = om.model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]
        ids = torch.tensor([[b % vocab for b in args.prompt.encode()]])
        streamer = ByteStreamer(ids.shape[1])
    ids = ids.to(args.device)
    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    with torch.no_grad():
        out = om.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]

    stats, res = om.runtime.stats, om.runtime.residency
    trace = om.runtime.recorded_trace()
    per_layer = res.pool_budget // expert_bytes if args.scope == "layer" else res.pool_budget // expert_bytes // layers
    belady = mo.simulate(trace, "belady", max(per_layer, 1), args.scope)
    if args.trace_out:
        trace.save(args.trace_out)
    print(
        f"\n{new_tokens} tokens in {seconds:.2f}s = {new_tokens / seconds:.2f} tokens/s (prefill included)\n"
        f"policy {args.policy} ({args.scope}), cache {per_layer} experts/layer of {total_experts // layers}\n"
        f"hit rate {stats.hit_rate:.3f} (1 - transfers/requests; Belady on the same trace: {belady.hit_rate:.3f})\n"
        f"on device when asked (ready) {stats.ready_rate:.3f}; prefetch hits {stats.prefetch_hits}, "
        f"wasted prefetches {stats.wasted_prefetches}\n"
        f"bytes moved {stats.bytes_moved / 2**20:.1f} MiB in {stats.copies} copies + {stats.prefetches} prefetches; "
        f"misses computed on CPU {stats.cpu_misses}; requests {stats.requests}",
        file=sys.stderr,
    )
    print_timeline(om, trace, seconds, new_tokens, max(per_layer, 1), args)
    om.close()
    if args.check:
        check_in_memory(model_dir, ids, out, args, dtype)
    if tmp is not None:
        tmp.cleanup()


def print_timeline(
    om: mo.OffloadedModel, trace: mo.Trace, seconds: float, tokens: int, per_layer: int, args: argparse.Namespace
) -> None:
    """The decode timeline (moe.offload.timeline) on this run's routing beside the measured ms/token.

    Compute is taken from this run (wall time minus the runtime's own host time for copies and
    forecasts), copies from a measured host -> device copy (none on a CPU device: the RAM tier is
    the device copy), so the policy used is reproduced only as well as that split is right; the
    other rows say what those policies would have done on the same routing.
    """
    from moe.offload import timeline

    rt = om.runtime
    host = rt.host_seconds["fetch"] + rt.host_seconds["forecast"]
    cuda = args.device.startswith("cuda")
    h2d = mo.measure(torch.device(args.device)).h2d_bytes_per_s if cuda else float("inf")
    hw = timeline.measured_hardware(
        trace,
        resident_s_per_token=max(seconds - host, 1e-9) / max(tokens, 1),
        h2d_bytes_per_s=h2d,
        copy_latency_s=0.0,
        async_copies=cuda,
        copy_host_s=rt.host_seconds["fetch"] / max(rt.host_calls["fetch"], 1),
        predict_host_s=rt.host_seconds["forecast"] / max(rt.host_calls["forecast"], 1),
    )
    names = dict.fromkeys((args.policy, "lru", "predictive", "oracle"))
    sim = {p: timeline.simulate_timeline(trace, p, per_layer, hw, scope=args.scope).ms_per_token for p in names}
    print(
        f"measured {1e3 * seconds / tokens:.2f} ms/token; timeline on this routing: "
        + ", ".join(f"{p}{' (used)' if p == args.policy else ''} {ms:.2f}" for p, ms in sim.items())
        + " ms/token",
        file=sys.stderr,
    )


def check_in_memory(
    model_dir: str, ids: torch.Tensor, out: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype | None
) -> None:
    """Greedy tokens of the model loaded whole by transformers (unpatched, in memory) against the
    offloaded run's; exits with status 1 if they differ."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").eval().to(args.device)
    with torch.no_grad():
        expected = full.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    same = expected.shape == out.shape and bool(torch.equal(expected.cpu(), out.cpu()))
    print(f"tokens equal to the in-memory model: {'yes' if same else 'NO'}", file=sys.stderr)
    if not same:
        raise SystemExit(1)


def _expert_sizes(model_dir: str) -> tuple[int, int, int]:
    """(total routed experts, bytes of one expert in the checkpoint dtype, MoE layers), from headers only."""
    import json

    from moe.offload.checkpoint import ShardReader, index_experts, shard_files

    with open(os.path.join(model_dir, "config.json")) as f:
        layout = "gpt_oss" if json.load(f).get("model_type") == "gpt_oss" else "hf"
    idx = index_experts(shard_files(model_dir), layout=layout)
    if not idx.experts:
        raise SystemExit(f"{model_dir} has no routed-expert tensors")
    reader = ShardReader()
    key = next(iter(idx.experts))
    d, i = reader.expert_shapes(idx.experts[key])
    loc = idx.experts[key]
    where = loc.gate or loc.fused_gate_up
    assert where is not None
    elem = reader.handle(where[0]).get_slice(where[1]).get_dtype()
    size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(elem, 4)
    return len(idx.experts), 3 * d * i * size, len({layer for layer, _ in idx.experts})


def _tokenizer(model_dir: str) -> object:
    if not any(os.path.exists(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
