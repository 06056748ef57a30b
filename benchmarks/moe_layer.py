"""One MoE layer, forward and forward + backward, ours against the peers and the GEMM floor.

    python benchmarks/moe_layer.py [--config standard|fine|small|both|all] [--threads 2] [--reps 10]
        [--dtype float32] [--device cpu|cuda] [--small] [--keep-freed-memory] [--csv PATH] [--png PATH]

--keep-freed-memory calls moe.keep_freed_memory() first, so glibc keeps freed memory for reuse. By
default every large tensor freed is returned to the OS and page-faulted in again when reallocated,
which on CPU costs every candidate a share of each training step (most those with large per-expert
weight gradients). jemalloc or tcmalloc (LD_PRELOAD) have the same effect.

Configs (T tokens, D dim, H expert hidden, E experts, K top-k; SwiGLU experts, F = 2H):
    standard  T=2048 D=1024 H=4096 E=8  K=2
    fine      T=2048 D=1024 H=512  E=64 K=6
    small     T=1024 D=512  H=512  E=8  K=2   (fixed costs; not in "both", which is standard + fine; "all" is the three)
    --small   the same shapes shrunk to a few-second smoke run (the test uses it).

Candidates, all in one process, built from the same weights (ours copied into each peer):
    ours[b]         moe.MoE(backend=b) for every backend moe.ops.backends_for("grouped_mm", device)
                    lists, plus "auto"; dropless.
    hf_mixtral      transformers' MixtralSparseMoeBlock, experts_implementation "eager" (a
                    per-expert loop) and "grouped_mm" (torch's grouped_mm); dropless.
    deepspeed       deepspeed.moe.layer.MoE, ep_size=1, capacity_factor 1.0: drops tokens.
    tutel           tutel's moe_layer (llama_ffn experts), capacity_factor 1.0: drops tokens.
    torch_gmm       a minimal MoE on torch's F.grouped_mm: our routing (softmax top-k,
                    renormalised), argsort, gather, two grouped_mm, index_add; dropless.
    floor           the GEMMs of the same FLOPs with no routing: [T*K, D] @ [D, 2H] and
                    [T*K, H] @ [H, D]; forward 2 GEMMs, backward 4 (dX and dW of each).
A peer that cannot be imported or built is skipped with the reason printed.

Each repetition runs every candidate once (round-robin, starting one later each repetition),
first the forward alone (no_grad), then forward + backward of a fixed upstream gradient.
Times are medians after warm-up; "x floor" divides by the floor's median; "paired" is the
median of per-repetition ratios to the floor (steadier on a shared, drifting machine). max|diff| compares
the output with ours[reference] where the same function is computed (for capacity-based
peers: over the tokens none of whose copies was dropped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import moe
from moe import ops

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)  # bench_harness (appended: it shadows nothing)
import bench_harness as harness  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration."""

    name: str
    tokens: int  # T
    dim: int  # D
    hidden: int  # H
    experts: int  # E
    top_k: int  # K

    def flops(self, backward: bool) -> float:
        """GEMM FLOPs of the routed experts (no router): forward 2 GEMMs, backward 4 more."""
        rows = self.tokens * self.top_k
        fwd = 2 * rows * self.dim * 2 * self.hidden + 2 * rows * self.hidden * self.dim
        return 3 * fwd if backward else fwd


CONFIGS = {
    "standard": Shape("standard", 2048, 1024, 4096, 8, 2),
    "fine": Shape("fine", 2048, 1024, 512, 64, 6),
    "small": Shape("small", 1024, 512, 512, 8, 2),  # issue 21's small shape: F = 2H = 1024
}
SMALL = {
    "standard": Shape("standard-small", 128, 64, 128, 8, 2),
    "fine": Shape("fine-small", 128, 64, 32, 16, 6),
    "small": Shape("small-small", 64, 32, 32, 8, 2),
}
CAPACITY_FACTOR = 1.0


@dataclass
class Candidate:
    """run(x [1, T, D]) -> y [1, T, D]; params get their grads cleared before each timing."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    same_function: bool = True  # computes ours' function exactly (up to fp rounding)
    dropped: int | None = None  # token copies dropped by a capacity limit (None: dropless)
    kept_T: torch.Tensor | None = None  # [T] bool: tokens with no dropped copy (capacity peers)
    note: str = ""
    fwd_s: list[float] = field(default_factory=list)
    fwd_bwd_s: list[float] = field(default_factory=list)
    diff: float | None = None


# ---------------------------------------------------------------- candidates


def _ours(shape: Shape, backend: str, reference: moe.MoE | None, dtype: torch.dtype, device: torch.device) -> moe.MoE:
    layer = moe.MoE(shape.dim, shape.hidden, shape.experts, shape.top_k, backend=backend)
    if reference is not None:
        layer.load_state_dict(reference.state_dict())
    return layer.to(device=device, dtype=dtype).train()


def _ours_candidates(
    shape: Shape, dtype: torch.dtype, device: torch.device
) -> tuple[moe.MoE, list[Candidate], list[str]]:
    torch.manual_seed(0)
    reference = _ours(shape, "reference", None, dtype, device)
    backends = ops.backends_for("grouped_mm", device)
    cands, skipped = [], []
    for b in ["reference", *[b for b in backends if b != "reference"], "auto"]:  # reference first: the oracle
        try:
            layer = reference if b == "reference" else _ours(shape, b, reference, dtype, device)
        except Exception as e:  # a backend that lands half-built must not stop the benchmark
            skipped.append(f"ours[{b}]: {type(e).__name__}: {e}")
            continue
        note = f"= {backends[0]}" if b == "auto" and backends else ""
        cands.append(Candidate(f"ours[{b}]", layer, list(layer.parameters()), note=note))
    return reference, cands, skipped


def _router_weight(layer: moe.MoE) -> torch.Tensor:
    """The top-k router's [E, D] weight."""
    weight = getattr(layer.router, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a top-k router with a weight, got {type(layer.router).__name__}")
    return weight


def _hf_mixtral(shape: Shape, ref: moe.MoE, implementation: str, dtype: torch.dtype, device: torch.device) -> Candidate:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.hidden,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(_router_weight(ref))
        block.experts.gate_up_proj.copy_(ref.experts.w_in.transpose(1, 2))  # [E, 2H, D], gate rows first
        block.experts.down_proj.copy_(ref.experts.w_out.transpose(1, 2))  # [E, D, H]
    block = block.to(device=device, dtype=dtype).train()
    return Candidate(f"hf_mixtral[{implementation}]", block, list(block.parameters()))


class _SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed: y = down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _ensure_process_group() -> None:
    """DeepSpeed and Tutel look up torch.distributed groups even with one rank: gloo, world size 1."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _deepspeed(shape: Shape, ref: moe.MoE, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> Candidate:
    import logging

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with _quiet_stdout():
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

    _ensure_process_group()
    expert = _SwiGLUExpert(shape.dim, shape.hidden)
    with _quiet_stdout():
        layer = DeepSpeedMoE(
            shape.dim,
            expert,
            num_experts=shape.experts,
            ep_size=1,
            k=shape.top_k,
            capacity_factor=CAPACITY_FACTOR,
            eval_capacity_factor=CAPACITY_FACTOR,
            use_rts=False,  # random token selection would make drops random
            top2_2nd_expert_sampling=False,  # Gumbel noise on the 2nd choice: not Mixtral routing
        )
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(_router_weight(ref))
        for e, ex in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            ex.gate_up.weight.copy_(ref.experts.w_in[e].t())
            ex.down.weight.copy_(ref.experts.w_out[e].t())
    layer = layer.to(device=device, dtype=dtype).train()
    with torch.no_grad():
        routes = layer.deepspeed_moe.gate(x.reshape(-1, shape.dim), None, True)[3]  # [K, T], -1 = dropped
    kept = (routes >= 0).all(dim=0)
    policy = "position" if shape.top_k <= 2 else "probs"
    return Candidate(
        "deepspeed",
        lambda t: layer(t)[0],
        list(layer.parameters()),
        same_function=False,
        dropped=int((routes < 0).sum()),
        kept_T=kept,
        note=f"cf={CAPACITY_FACTOR}, drop policy {policy}",
    )


def _tutel(shape: Shape, ref: moe.MoE, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> Candidate:
    with _quiet_stdout():
        from tutel import moe as tutel_moe
        from tutel.impls.fast_dispatch import extract_critical

    _ensure_process_group()
    with _quiet_stdout():
        layer = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": shape.top_k, "capacity_factor": CAPACITY_FACTOR, "fp32_gate": True},
            model_dim=shape.dim,
            experts={
                "type": "llama_ffn",
                "num_experts_per_device": shape.experts,
                "hidden_size_per_expert": shape.hidden,
            },
        )
    h = shape.hidden
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(_router_weight(ref))
        layer.experts.W_fc1.copy_(ref.experts.w_in[:, :, :h].reshape(-1))  # gate [E, D, H]
        layer.experts.W_fc2.copy_(ref.experts.w_in[:, :, h:].reshape(-1))  # up [E, D, H]
        layer.experts.W_fc3.copy_(ref.experts.w_out.reshape(-1))  # down [E, H, D]
        scores = F.softmax(x.reshape(-1, shape.dim).float() @ _router_weight(ref).float().t(), dim=1)
        crit, _ = extract_critical(scores, shape.top_k, loss_fn=None, capacity_factor=CAPACITY_FACTOR)
    capacity = crit[4]
    dropped_KT = torch.stack([loc >= capacity for loc in crit[2]])
    layer = layer.to(device=device, dtype=dtype).train()
    return Candidate(
        "tutel",
        layer,
        list(layer.parameters()),
        same_function=False,
        dropped=int(dropped_KT.sum()),
        kept_T=~dropped_KT.any(dim=0),
        note=f"cf={CAPACITY_FACTOR}, capacity {capacity}",
    )


class TorchGroupedMoE(nn.Module):
    """The minimal MoE on torch's grouped_mm: softmax top-k (renormalised), argsort, gather,
    grouped_mm -> SwiGLU -> grouped_mm, weight, index_add. Same parameters as ours."""

    def __init__(self, ref: moe.MoE) -> None:
        super().__init__()
        self.top_k = ref.config.top_k
        self.router = nn.Parameter(_router_weight(ref).detach().clone())  # [E, D]
        self.w_in = nn.Parameter(ref.experts.w_in.detach().clone())  # [E, D, 2H]
        self.w_out = nn.Parameter(ref.experts.w_out.detach().clone())  # [E, H, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        probs_TE = F.softmax(x_TD.float() @ self.router.float().t(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
        token_N = order_N // self.top_k
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.router.shape[0])
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        h_NF = F.grouped_mm(x_TD[token_N], self.w_in, offs=offs_E)
        gate, up = h_NF.chunk(2, dim=-1)
        y_ND = F.grouped_mm(F.silu(gate) * up, self.w_out, offs=offs_E)
        y_ND = y_ND * weights_TK.reshape(-1)[order_N].unsqueeze(1).to(y_ND.dtype)
        out = torch.zeros_like(x_TD).index_add(0, token_N, y_ND)
        return out.view(x.shape)


def _torch_grouped(shape: Shape, ref: moe.MoE, dtype: torch.dtype, device: torch.device) -> Candidate:
    if not hasattr(F, "grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm")
    layer = TorchGroupedMoE(ref).to(device=device, dtype=dtype)
    return Candidate("torch_gmm", layer, list(layer.parameters()), note="our routing on F.grouped_mm")


class GemmFloor:
    """The routed experts' GEMMs on the same FLOPs with no routing and no activation.

    forward:  h = a @ W1 ([T*K, D] @ [D, 2H]), y = g @ W2 ([T*K, H] @ [H, D])
    backward: dg = dy @ W2^T, dW2 = g^T @ dy, da = dh @ W1^T, dW1 = a^T @ dh
    (g and dh are fixed inputs of the right shapes, so only the six GEMMs are timed).
    """

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device) -> None:
        rows, d, h = shape.tokens * shape.top_k, shape.dim, shape.hidden
        mk = lambda *s: torch.randn(*s, dtype=dtype, device=device) * 0.02
        self.a, self.w1, self.g, self.w2 = mk(rows, d), mk(d, 2 * h), mk(rows, h), mk(h, d)
        self.dy, self.dh = mk(rows, d), mk(rows, 2 * h)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a @ self.w1, self.g @ self.w2

    def forward_backward(self) -> None:
        self.forward()
        self.dy @ self.w2.t(), self.g.t() @ self.dy
        self.dh @ self.w1.t(), self.a.t() @ self.dh


# ---------------------------------------------------------------- timing


Clock = harness.Clock  # wall time on CPU; CUDA events (with a synchronize) on CUDA


def _clear_grads(params: list[nn.Parameter], x: torch.Tensor) -> None:
    for p in params:
        p.grad = None
    x.grad = None


def _step_fns(c: Candidate, x: torch.Tensor, dy: torch.Tensor) -> tuple[Callable[[], Any], Callable[[], Any]]:
    def fwd() -> None:
        with torch.no_grad():
            c.run(x)

    def fwd_bwd() -> None:
        c.run(x).backward(dy)

    return fwd, fwd_bwd


def measure(
    cands: list[Candidate],
    floor: GemmFloor,
    x: torch.Tensor,
    dy: torch.Tensor,
    reps: int,
    warmup: int,
    clock: Clock,
    progress: bool = False,
) -> tuple[list[float], list[float]]:
    """Fills each candidate's fwd_s / fwd_bwd_s; returns the floor's (fwd, fwd+bwd) samples."""
    floor_fwd: list[float] = []
    floor_fb: list[float] = []
    entries: list[Candidate | None] = [*cands, None]  # None = the floor
    for rep in range(warmup + reps):
        shift = rep % len(entries)
        for c in entries[shift:] + entries[:shift]:
            if c is None:
                tf, tfb = clock.time(floor.forward), clock.time(floor.forward_backward)
                if progress:
                    print(
                        f"  rep {rep + 1}/{warmup + reps} floor: {1e3 * tf:.0f} / {1e3 * tfb:.0f} ms", file=sys.stderr
                    )
                if rep >= warmup:
                    floor_fwd.append(tf)
                    floor_fb.append(tfb)
                continue
            fwd, fwd_bwd = _step_fns(c, x, dy)
            tf = clock.time(fwd)
            _clear_grads(c.params, x)
            tfb = clock.time(fwd_bwd)
            _clear_grads(c.params, x)
            if progress:
                print(f"  rep {rep + 1}/{warmup + reps} {c.name}: {1e3 * tf:.0f} / {1e3 * tfb:.0f} ms", file=sys.stderr)
            if rep >= warmup:
                c.fwd_s.append(tf)
                c.fwd_bwd_s.append(tfb)
    return floor_fwd, floor_fb


# ---------------------------------------------------------------- driver


def build(shape: Shape, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[list[Candidate], list[str]]:
    """All candidates that can be built here, and a reason for each one that cannot."""
    ref, cands, skipped = _ours_candidates(shape, dtype, device)
    peers: list[tuple[str, Callable[[], Candidate]]] = [
        ("hf_mixtral[eager]", lambda: _hf_mixtral(shape, ref, "eager", dtype, device)),
        ("hf_mixtral[grouped_mm]", lambda: _hf_mixtral(shape, ref, "grouped_mm", dtype, device)),
        ("deepspeed", lambda: _deepspeed(shape, ref, x, dtype, device)),
        ("tutel", lambda: _tutel(shape, ref, x, dtype, device)),
        ("torch_gmm", lambda: _torch_grouped(shape, ref, dtype, device)),
    ]
    for name, make in peers:
        try:
            cands.append(make())
        except Exception as e:  # ImportError, or a peer that does not support this shape/device
            skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return cands, skipped


def check_outputs(cands: list[Candidate], x: torch.Tensor, strict: bool = True) -> list[str]:
    """Sets each candidate's max|diff| against ours[reference] (the first candidate built).

    A candidate that raises, returns the wrong shape or non-finite values is an error
    (strict=True) or removed from `cands` with the reason returned (strict=False).
    """
    failed: list[str] = []
    with torch.no_grad():
        want = cands[0].run(x).float()
        for c in list(cands):
            try:
                got = c.run(x)
                if got.shape != x.shape:
                    raise RuntimeError(f"returned shape {tuple(got.shape)}, expected {tuple(x.shape)}")
                if not torch.isfinite(got).all():
                    raise RuntimeError("returned non-finite values")
            except Exception as e:
                if strict:
                    raise RuntimeError(f"{c.name}: {e}") from e
                failed.append(f"{c.name}: failed the output check: {type(e).__name__}: {str(e)[:200]}")
                cands.remove(c)
                continue
            diff = (got.float() - want).abs()
            if c.kept_T is not None:
                diff = diff.reshape(-1, x.shape[-1])[c.kept_T]
            c.diff = float(diff.max()) if diff.numel() else 0.0
    return failed


def run_config(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    reps: int,
    warmup: int,
    skip: tuple[str, ...] = (),
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    torch.manual_seed(1)
    x = torch.randn(1, shape.tokens, shape.dim, device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(1, shape.tokens, shape.dim, device=device, dtype=dtype)
    cands, skipped = build(shape, x.detach(), dtype, device)
    skipped += check_outputs(cands, x.detach(), strict=False)
    skipped += [f"{c.name}: --skip" for c in cands if c.name.startswith(skip)]
    cands = [c for c in cands if not c.name.startswith(skip)]
    floor = GemmFloor(shape, dtype, device)
    floor_fwd, floor_fb = measure(cands, floor, x, dy, reps, warmup, Clock(device), progress)
    f_fwd, f_fb = statistics.median(floor_fwd), statistics.median(floor_fb)
    rows = []
    for c in cands:
        fwd, fb = statistics.median(c.fwd_s), statistics.median(c.fwd_bwd_s)
        row = _row(shape, c.name, fwd, fb, f_fwd, f_fb, c.dropped, c.diff, c.note)
        # Ratio to the floor of the same repetition, then the median: steadier when the load drifts.
        row["fwd_bwd_x_floor_paired"] = statistics.median(t / f for t, f in zip(c.fwd_bwd_s, floor_fb, strict=True))
        rows.append(row)
    floor_row = _row(shape, "floor", f_fwd, f_fb, f_fwd, f_fb, None, None, "GEMMs only")
    floor_row["fwd_bwd_x_floor_paired"] = 1.0
    rows.append(floor_row)
    return rows, skipped


def _row(
    shape: Shape,
    name: str,
    fwd: float,
    fb: float,
    f_fwd: float,
    f_fb: float,
    dropped: int | None,
    diff: float | None,
    note: str,
) -> dict[str, Any]:
    return {
        "config": shape.name,
        "candidate": name,
        "fwd_ms": 1e3 * fwd,
        "fwd_bwd_ms": 1e3 * fb,
        "fwd_x_floor": fwd / f_fwd,
        "fwd_bwd_x_floor": fb / f_fb,
        "fwd_bwd_gflops": shape.flops(backward=True) / fb / 1e9,
        "dropped": "" if dropped is None else dropped,
        "max_abs_diff": "" if diff is None else diff,
        "note": note,
    }


def print_table(shape: Shape, rows: list[dict[str, Any]], skipped: list[str], header: str) -> None:
    copies = shape.tokens * shape.top_k
    print(
        f"\n# {shape.name}: T={shape.tokens} D={shape.dim} H={shape.hidden} E={shape.experts} K={shape.top_k} "
        f"SwiGLU; {header}"
    )
    print(
        f"{'candidate':<24} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x fl':>9} {'f+b x fl':>9} {'paired':>7} "
        f"{'GFLOP/s':>8} {'dropped':>12} {'max|diff|':>10}  note"
    )
    for r in rows:
        dropped = "" if r["dropped"] == "" else f"{r['dropped']}/{copies}"
        diff = "" if r["max_abs_diff"] == "" else f"{r['max_abs_diff']:.1e}"
        print(
            f"{r['candidate']:<24} {r['fwd_ms']:>9.1f} {r['fwd_bwd_ms']:>11.1f} {r['fwd_x_floor']:>9.2f} "
            f"{r['fwd_bwd_x_floor']:>9.2f} {r['fwd_bwd_x_floor_paired']:>7.2f} {r['fwd_bwd_gflops']:>8.1f} "
            f"{dropped:>12} {diff:>10}  {r['note']}"
        )
    for s in skipped:
        print(f"skipped {s}")
    print("paired: median over repetitions of fwd+bwd / floor's fwd+bwd in the same repetition")
    if any(r["dropped"] != "" for r in rows):
        print(
            f"note: capacity-based peers (capacity factor {CAPACITY_FACTOR}) drop token copies (their GEMMs still "
            "run on full capacity buffers, so no fewer FLOPs); "
            "ours is dropless. Their max|diff| is over tokens with no dropped copy."
        )
    sys.stdout.flush()


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    harness.write_csv(path, rows)
    print(f"wrote {path}")


def write_png(path: str, rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib missing: no {path}")
        return
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4), squeeze=False)
    for ax, config in zip(axes[0], configs, strict=True):
        sub = [r for r in rows if r["config"] == config]
        names = [r["candidate"] for r in sub]
        ax.barh(names, [r["fwd_bwd_x_floor"] for r in sub], color="tab:blue", label="fwd+bwd")
        ax.barh(names, [r["fwd_x_floor"] for r in sub], color="tab:orange", height=0.4, label="fwd")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("time / GEMM floor (lower is better)")
        ax.set_title(config)
        ax.invert_yaxis()
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("standard", "fine", "small", "both", "all"), default="both")
    parser.add_argument("--small", action="store_true", help="shrunken shapes: a smoke run of a few seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--progress", action="store_true", help="print each timing to stderr as it is taken")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated candidate name prefixes not to time, e.g. 'hf_mixtral[eager],ours[ref'",
    )
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="glibc keeps freed memory (no page faults per step)"
    )
    parser.add_argument("--csv", default="bench_out/moe_layer.csv", help="'' = no CSV")
    parser.add_argument("--png", default="bench_out/moe_layer.png", help="'' = no plot")
    args = parser.parse_args(argv)
    keeps_freed_memory = args.keep_freed_memory and moe.keep_freed_memory()
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    table = SMALL if args.small else CONFIGS
    names = {"both": ["standard", "fine"], "all": ["standard", "fine", "small"]}.get(args.config, [args.config])
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    header = f"{args.dtype}, {where}, median of {args.reps} (warm-up {args.warmup}), torch {torch.__version__}"
    if keeps_freed_memory:
        header += ", glibc keeps freed memory"
    rows: list[dict[str, Any]] = []
    for name in names:
        shape = table[name]
        skip = tuple(p for p in args.skip.split(",") if p)
        config_rows, skipped = run_config(shape, dtype, device, args.reps, args.warmup, skip, args.progress)
        print_table(shape, config_rows, skipped, header)
        rows += config_rows
    if args.csv:
        write_csv(args.csv, rows)
    if args.png:
        write_png(args.png, rows)
    return rows


if __name__ == "__main__":
    main()
