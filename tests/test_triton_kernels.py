"""Triton grouped GEMMs (moe.kernels) against moe.reference: every entry point under the CPU
interpreter (fp32/fp16 exact-ish, bf16 through the upcast path), forward and every gradient,
the custom ops under opcheck, the autotune path, bad input, the "triton" backend in the
registry and MoE(backend="triton") against MoE(backend="reference"). CUDA tests skip without a GPU.

Shapes: T tokens, M rows sorted by expert (rows past counts.sum() are padding), K in features,
N out features (H with SwiGLU), E experts. The interpreter costs ~10 ms per program: tiny shapes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import moe  # noqa: E402
from moe import ops, reference  # noqa: E402
from moe.ops import triton as ops_triton  # noqa: E402

kops = ops_triton.kernel_ops()  # moe.kernels.ops, also from a source checkout that was not installed

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
MODES = {  # name: (gather, weighted, swiglu)
    "plain": (False, False, False),
    "gather": (True, False, False),
    "weighted": (False, True, False),
    "swiglu": (False, False, True),
    "all": (True, True, True),
}


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def oracle(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    token_idx: torch.Tensor | None,
    weights: torch.Tensor | None,
    swiglu: bool,
) -> torch.Tensor:
    """weights * act(x[token_idx] @ w[e]) from moe.reference, in the inputs' dtype."""
    x_rows = x if token_idx is None else reference.permute(x, token_idx)
    h = reference.grouped_mm(x_rows, w, counts)
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    return h if weights is None else h * weights[:, None].to(h.dtype)


def make_inputs(
    counts: list[int], rows: int, tokens: int, K: int, N: int, mode: str, dtype: torch.dtype, device=CPU
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, bool]:
    gather, weighted, swiglu = MODES[mode]
    x = torch.randn(tokens if gather else rows, K, device=device) * 0.5
    w = torch.randn(len(counts), K, 2 * N if swiglu else N, device=device) / K**0.5
    token_idx = torch.randint(0, max(tokens, 1), (rows,), device=device) if gather else None
    weights = torch.rand(rows, device=device) if weighted else None
    return (
        x.to(dtype),
        w.to(dtype),
        torch.tensor(counts, dtype=torch.int64, device=device),
        token_idx,
        weights,
        swiglu,
    )


def check_fwd_bwd(x, w, counts, token_idx, weights, swiglu, dtype, save_pre=True) -> None:  # type: ignore[no-untyped-def]
    """Kernel forward and grads (x, w, weights) vs the fp32 reference on the same rounded inputs."""
    inputs = [x, w] + ([weights] if weights is not None else [])
    ours_in = [t.detach().clone().requires_grad_() for t in inputs]
    ref_in = [t.detach().float().clone().requires_grad_() for t in inputs]
    ow = ours_in[2] if weights is not None else None
    rw = ref_in[2] if weights is not None else None
    act = "swiglu" if swiglu else "none"
    y = kops.fused_grouped_mm(ours_in[0], ours_in[1], counts, token_idx, ow, act, save_pre=save_pre)
    y_ref = oracle(ref_in[0], ref_in[1], counts, token_idx, rw, swiglu)
    y_ref = y_ref + sum(0.0 * t.sum() for t in ref_in)  # zero (not missing) grads when nothing is routed
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.float(), y_ref, **TOL[dtype])
    pad = int(counts.sum())
    assert torch.all(y[pad:] == 0), "padding rows must be zero"
    dy = torch.randn_like(y_ref)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for ours, ref in zip(ours_in, ref_in, strict=True):
        assert ours.grad is not None and ours.grad.dtype == ours.dtype
        torch.testing.assert_close(ours.grad.float(), ref.grad, **TOL[dtype])


# ---------------------------------------------------------------- kernels vs reference (CPU interpreter)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_grouped_mm_matches_reference(mode: str, dtype: torch.dtype) -> None:
    # E=4 with an empty expert, K and N not powers of two, 2 padding rows (counts sum 10 < M 12).
    check_fwd_bwd(*make_inputs([3, 0, 6, 1], 12, 7, 24, 20, mode, dtype), dtype)


@pytest.mark.parametrize("K", [32, 64, 40])
def test_k_multiple_of_block_k_and_ragged(K: int) -> None:
    """EVEN_K (K % BLOCK_K == 0: loads unmasked in K) and the masked K tail agree with the oracle."""
    check_fwd_bwd(*make_inputs([4, 1, 3], 9, 6, K, 12, "all", torch.float32), torch.float32)


@pytest.mark.parametrize("save_pre", [True, False])
def test_swiglu_recompute_matches_saved(save_pre: bool) -> None:
    check_fwd_bwd(*make_inputs([2, 3], 5, 4, 16, 12, "all", torch.float32), torch.float32, save_pre=save_pre)


@pytest.mark.parametrize(
    "counts,rows,tokens",
    [
        ([0, 1, 0], 1, 1),  # one token, experts without rows on both sides
        ([0, 0, 0], 3, 2),  # nothing routed: every row is padding
        ([5], 5, 3),  # one expert
        ([0, 0], 0, 0),  # empty input
    ],
)
@pytest.mark.parametrize("mode", ["plain", "all"])
def test_edge_shapes(counts: list[int], rows: int, tokens: int, mode: str) -> None:
    check_fwd_bwd(*make_inputs(counts, rows, tokens, 10, 6, mode, torch.float32), torch.float32)


def test_tiles_span_experts_and_columns() -> None:
    # More rows than one interpreter tile (BLOCK_M 32) per expert and N > BLOCK_N 64: several
    # row tiles per expert, tiles straddling expert boundaries, and a column-tile remainder.
    check_fwd_bwd(*make_inputs([40, 0, 27, 1], 70, 30, 20, 70, "gather", torch.float32), torch.float32)


def test_entry_points() -> None:
    x, w, counts, _, _, _ = make_inputs([3, 0, 4], 9, 0, 12, 10, "plain", torch.float32)
    torch.testing.assert_close(kops.grouped_mm(x, w, counts), reference.grouped_mm(x, w, counts), **TOL[torch.float32])
    weights = torch.rand(9)
    torch.testing.assert_close(
        kops.grouped_mm_weighted(x, w, counts, weights),
        reference.grouped_mm(x, w, counts) * weights[:, None],
        **TOL[torch.float32],
    )
    x_TK, idx = torch.randn(5, 12), torch.randint(0, 5, (9,))
    torch.testing.assert_close(
        kops.gather_grouped_mm(x_TK, w, counts, idx),
        reference.grouped_mm(x_TK[idx], w, counts),
        **TOL[torch.float32],
    )
    dy = torch.randn(9, 10)
    torch.testing.assert_close(
        kops.grouped_mm_wgrad(x, dy, counts), reference.grouped_mm_wgrad(x, dy, counts), **TOL[torch.float32]
    )
    # Through the registry: explicit backend="triton" on CPU runs the interpreter.
    torch.testing.assert_close(
        ops.grouped_mm(x, w, counts, backend="triton"), reference.grouped_mm(x, w, counts), **TOL[torch.float32]
    )


def test_int32_indices_and_counts() -> None:
    x, w, _, _, _, _ = make_inputs([2, 3], 5, 0, 8, 6, "plain", torch.float32)
    x_TK, idx = torch.randn(4, 8), torch.tensor([3, 0, 1, 1, 2], dtype=torch.int32)
    counts = torch.tensor([2, 3], dtype=torch.int32)
    torch.testing.assert_close(
        kops.gather_grouped_mm(x_TK, w, counts, idx), reference.grouped_mm(x_TK[idx.long()], w, counts.long())
    )


# ---------------------------------------------------------------- custom ops, autotune, bad input


def test_opcheck_custom_ops() -> None:
    x, w, counts, idx, weights, _ = make_inputs([2, 0, 3], 6, 4, 8, 6, "all", torch.float32)
    w = w.requires_grad_()
    torch.library.opcheck(torch.ops.moe_triton.gmm.default, (x, w, counts, idx, weights, True, True))
    torch.library.opcheck(torch.ops.moe_triton.gmm.default, (x, w, counts, idx, None, False, False))
    dy = torch.randn(6, 6)
    torch.library.opcheck(torch.ops.moe_triton.gmm_wgrad.default, (x, dy, counts, idx, weights))


def test_autotune_under_interpreter() -> None:
    from moe.kernels import grouped_gemm, jit

    assert len(jit.wall_clock_bench(lambda: None, quantiles=[0.5, 0.2, 0.8])) == 3
    x, w, counts, idx, weights, _ = make_inputs([3, 0, 5], 9, 6, 12, 10, "all", torch.float32)
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    y, pre = grouped_gemm.gmm_forward(x, w, offsets, idx, weights, swiglu=True, store_pre=True, autotune=True)
    torch.testing.assert_close(y, oracle(x, w, counts, idx, weights, True))
    torch.testing.assert_close(pre, oracle(x, w, counts, idx, None, False))
    tuner = grouped_gemm._fwd_kernel(True, True)
    assert len(tuner.configs) == 2 and len(tuner.cache) == 1  # both configs timed, the best kept
    dy = torch.randn(9, 20)
    dw = grouped_gemm.gmm_wgrad(x, dy, offsets, idx, weights, autotune=True)
    torch.testing.assert_close(dw, reference.grouped_mm_wgrad(x[idx], dy * weights[:, None], counts))
    assert len(grouped_gemm._wgrad_kernel(True, True).cache) == 1


def test_bad_input() -> None:
    x, w, counts = torch.randn(5, 8), torch.randn(2, 8, 6), torch.tensor([2, 3])
    cases = [
        (ValueError, lambda: kops.grouped_mm(x[0], w, counts)),  # x not 2-D
        (ValueError, lambda: kops.grouped_mm(x, w[0], counts)),  # w not 3-D
        (ValueError, lambda: kops.grouped_mm(torch.randn(5, 7), w, counts)),  # K mismatch
        (TypeError, lambda: kops.grouped_mm(x.double(), w.double(), counts)),  # unsupported dtype
        (TypeError, lambda: kops.grouped_mm(x.half(), w, counts)),  # mixed dtypes
        (ValueError, lambda: kops.grouped_mm(x, w, torch.tensor([5]))),  # counts not [E]
        (ValueError, lambda: kops.grouped_mm(x, w, counts.float())),  # float counts
        (ValueError, lambda: kops.grouped_mm(x, w, torch.tensor([4, 3]))),  # counts sum > rows
        (ValueError, lambda: kops.grouped_mm(x, w, torch.tensor([6, -1]))),  # negative count
        (ValueError, lambda: kops.gather_grouped_mm(x, w, counts, torch.tensor([0, 1, 5, 2, 3]))),  # idx >= T
        (ValueError, lambda: kops.gather_grouped_mm(x, w, counts, torch.tensor([0, 1, -3, 2, 3]))),  # idx < 0
        (ValueError, lambda: kops.fused_grouped_mm(x, torch.randn(2, 8, 5), counts, activation="swiglu")),
        (ValueError, lambda: kops.fused_grouped_mm(x, w, counts, activation="relu")),  # type: ignore[arg-type]
        (ValueError, lambda: kops.gather_grouped_mm(x, w, counts, torch.zeros(5))),  # float token_idx
        (ValueError, lambda: kops.grouped_mm_weighted(x, w, counts, torch.ones(4))),  # weights not [M]
        (ValueError, lambda: ops_triton.expert_mlp(x, w, w, counts, torch.zeros(5, dtype=torch.long), x[:, 0], "relu")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()


def test_strided_index_and_weight_vectors() -> None:
    """token_idx / weights that are column views (stride 2) read the right elements."""
    x_t, w, counts = torch.randn(4, 8), torch.randn(3, 8, 6), torch.tensor([3, 0, 2])
    idx = torch.randint(0, 4, (5, 2))[:, 1]
    weights = torch.rand(5, 2)[:, 1]
    assert idx.stride() == (2,) and weights.stride() == (2,)
    got = kops.fused_grouped_mm(x_t, w, counts, token_idx_M=idx, weights_M=weights)
    torch.testing.assert_close(got, oracle(x_t, w, counts, idx, weights, False), **TOL[torch.float32])


def test_layer_gradients_of_gradients_match_reference() -> None:
    """create_graph through the fused SwiGLU (its kept pre-activation) and through dW (a weight penalty)."""
    torch.manual_seed(0)
    layers = {b: moe.MoE(6, 5, 4, 2, backend=b) for b in ("reference", "triton")}
    layers["triton"].load_state_dict(layers["reference"].state_dict())
    out = {}
    for b, layer in layers.items():
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        g_x, g_w = torch.autograd.grad(layer(x).pow(2).sum(), (x, layer.experts.w_in), create_graph=True)
        out[b] = torch.autograd.grad(g_x.pow(2).sum() + g_w.pow(2).sum(), x)[0]
    torch.testing.assert_close(out["triton"], out["reference"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the "triton" backend and the layer


def test_registry_backend() -> None:
    assert "triton" not in ops.backends_for("grouped_mm", CPU)  # auto never picks the interpreter
    assert ops.backends_for("grouped_mm", torch.device("cuda"))[0] == "triton"
    assert not ops_triton.uses_triton("auto", CPU) and ops_triton.uses_triton("triton", CPU)
    assert ops_triton.uses_triton("auto", torch.device("cuda")) and not ops_triton.uses_triton("reference", CPU)
    x, idx, wts = torch.randn(4, 3), torch.tensor([2, 0, 1]), torch.rand(3)
    torch.testing.assert_close(ops.permute(x, idx, "triton"), x[idx])  # index ops fall back to another backend
    torch.testing.assert_close(ops.unpermute(x[idx], idx, wts, 4, "triton"), reference.unpermute(x[idx], idx, wts, 4))


def test_import_moe_imports_no_triton() -> None:
    code = "import sys, moe, moe.layer; assert not {'triton', 'torch._dynamo', 'moe.kernels.ops'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "activation,top_k,capacity_factor",
    [("swiglu", 2, 1.0), ("swiglu", 1, None), ("gelu", 2, None), ("gelu", 1, 0.75)],
)
def test_layer_triton_matches_reference(activation: str, top_k: int, capacity_factor: float | None) -> None:
    kwargs = dict(dim=12, hidden_dim=20, num_experts=4, top_k=top_k, activation=activation)
    ref = moe.MoE(**kwargs, capacity_factor=capacity_factor, backend="reference")
    ours = moe.MoE(**kwargs, capacity_factor=capacity_factor, backend="triton")
    ours.load_state_dict(ref.state_dict())
    assert ours.dispatcher.fused(CPU) and not ref.dispatcher.fused(CPU)
    x = torch.randn(2, 9, 12)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    if capacity_factor is not None:
        assert int(ref._dropped) > 0, "the capacity case must drop copies"
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert p_ref.grad is not None and p_ours.grad is not None, name
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- CUDA (compiled kernels; skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(mode: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TRITON_AUTOTUNE", "0")  # one config: no minutes of autotuning per variant
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cuda = torch.device("cuda")
    check_fwd_bwd(*make_inputs([300, 0, 517, 1, 64], 900, 700, 136, 200, mode, dtype, cuda), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_layer_auto_is_fused_and_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    kwargs = dict(dim=64, hidden_dim=96, num_experts=8, top_k=2, capacity_factor=1.0)
    ref = moe.MoE(**kwargs, backend="reference").cuda()
    ours = moe.MoE(**kwargs, backend="auto").cuda()
    ours.load_state_dict(ref.state_dict())
    assert ours.dispatcher.fused(torch.device("cuda"))
    x = torch.randn(4, 33, 64, device="cuda")
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=4e-2, atol=4e-2)
