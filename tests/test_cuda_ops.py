"""The CUDA kernels of the moe:: ops (csrc/cuda/) against moe.reference on the same data.

Index ops are compared exactly, sums with the project tolerances (and tightly against the CPU op,
which sums in the same order). Skips itself without a GPU or without a moe._C built with CUDA
(`python3 setup.py build_ext --inplace` on a machine with nvcc and a CUDA torch).

Shapes: T tokens, D features, E experts, K copies per token, N = T * K dispatched rows.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from conftest import TOLERANCES, assert_close

import moe
from moe import reference


def _cuda_kernels_loaded() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("moe._C")
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("moe::permute", "CUDA")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_kernels_loaded(), reason="needs a CUDA device and moe._C built with CUDA"),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEV = "cuda"


@pytest.fixture(autouse=True, scope="module")
def _python_registrations() -> None:
    """Imports every moe.ops backend and asks each where it runs, which loads moe._C's Python-side
    fake / autograd registrations (backend "cpp" registers them on its first availability check)."""
    import moe.ops

    for info in pkgutil.iter_modules(moe.ops.__path__):
        try:
            importlib.import_module(f"moe.ops.{info.name}")
        except ImportError:  # an optional backend whose dependency is missing registers nothing
            pass
    for op in moe.ops.registry.OPS:
        moe.ops.backends_for(op, torch.device(DEV))


def _routing(t: int, k: int, e: int, drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] (distinct per token, some -1 when drop > 0) and fp32 weights [T, K] on CUDA (K <= E)."""
    ids_TK = torch.rand(t, e, device=DEV).argsort(dim=1)[:, :k].contiguous()
    if drop > 0:
        ids_TK = torch.where(torch.rand(t, k, device=DEV) < drop, -1, ids_TK)
    return ids_TK, torch.rand(t, k, device=DEV)


def _dispatch_rows(t: int, k: int, e: int, drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """token_idx [N] in expert-sorted order (as the dispatcher builds it) and weights [N]."""
    ids_TK, w_TK = _routing(t, k, e, drop)
    order, _ = reference.sort_by_expert(ids_TK, e)
    return order // k, w_TK.reshape(-1)[order]


# ---- sort_by_expert / align_block_size ----

SORT_CASES = [  # (N, E, dropped fraction)
    (0, 4, 0.0),
    (1, 1, 0.0),
    (5, 8, 0.0),  # experts with no copies
    (33, 3, 0.3),
    (1000, 7, 0.1),
    (4097, 300, 0.0),  # several chunks, many bins
    (20000, 7000, 0.05),  # bins too many for shared-memory cursors: the global-memory path
    (1 << 20, 64, 0.01),  # 1M copies
    (1 << 20, 8, 0.0),
]


@pytest.mark.parametrize("n,e,drop", SORT_CASES, ids=lambda c: str(c))
def test_sort_by_expert_matches_reference_exactly(n: int, e: int, drop: float) -> None:
    ids = torch.randint(0, e, (n,), device=DEV)
    ids = torch.where(torch.rand(n, device=DEV) < drop, -1, ids)
    order, counts = torch.ops.moe.sort_by_expert(ids, e)
    order_ref, counts_ref = reference.sort_by_expert(ids, e)
    assert order.dtype == counts.dtype == torch.int64 and counts.shape == (e,)
    assert torch.equal(order, order_ref)
    assert torch.equal(counts, counts_ref)


def test_sort_by_expert_takes_2d_ids_and_any_negative_as_dropped() -> None:
    ids_TK = torch.tensor([[2, -1], [0, 2], [-5, 0], [1, 2]], device=DEV)
    order, counts = torch.ops.moe.sort_by_expert(ids_TK, 4)
    assert order.tolist() == [2, 5, 6, 0, 3, 7, 1, 4]  # stable per expert, dropped slots 1 and 4 last
    assert counts.tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("e", [1, 5, 2000])
def test_align_block_size_matches_cpu_op(e: int, block_size: int) -> None:
    counts = torch.randint(0, 100, (e,))
    counts[0] = 0
    got = torch.ops.moe.align_block_size(counts.to(DEV), block_size)
    padded = (counts + block_size - 1) // block_size * block_size
    want = torch.cat([counts.new_zeros(1), padded.cumsum(0)])
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu(), torch.ops.moe.align_block_size(counts, block_size))


# ---- permute / scatter_rows / unpermute / unpermute_backward ----

ROW_CASES = [  # (T, D, E, K, dropped fraction)
    (0, 8, 4, 2, 0.0),
    (1, 8, 4, 2, 0.0),
    (3, 12, 8, 1, 0.0),  # experts with no tokens
    (7, 3, 1, 1, 0.0),  # odd row bytes: 2- and 4-byte copies, no packs
    (33, 20, 6, 3, 0.2),
    (100, 1000, 5, 4, 0.1),
    (257, 1024, 16, 8, 0.0),
]
ROW_IDS = ["T{}_D{}_E{}_K{}_drop{}".format(*c) for c in ROW_CASES]


@pytest.mark.parametrize("dtype", DTYPES + [torch.int8])
@pytest.mark.parametrize("t,d,e,k,drop", ROW_CASES, ids=ROW_IDS)
def test_permute_matches_reference_exactly(t: int, d: int, e: int, k: int, drop: float, dtype: torch.dtype) -> None:
    x_TD = torch.randn(t, d, device=DEV).mul(10).to(dtype)
    token_idx_N, _ = _dispatch_rows(t, k, e, drop)
    got = torch.ops.moe.permute(x_TD, token_idx_N)
    assert got.dtype == dtype and torch.equal(got, reference.permute(x_TD, token_idx_N))


def test_permute_non_contiguous_and_misaligned_inputs() -> None:
    x = torch.randn(40, 24, device=DEV)
    idx = torch.randint(0, 20, (50,), device=DEV)
    for x_TD in (x[::2], x[:, 1:17], x.t()[:, :20].t(), x.flatten()[1:].reshape(-1, 7)[:20]):
        assert torch.equal(torch.ops.moe.permute(x_TD, idx), reference.permute(x_TD, idx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d,e,k,drop", ROW_CASES, ids=ROW_IDS)
def test_unpermute_and_scatter_rows_match_reference(
    t: int, d: int, e: int, k: int, drop: float, dtype: torch.dtype
) -> None:
    token_idx_N, w_N = _dispatch_rows(t, k, e, drop)
    y_ND = torch.randn(token_idx_N.numel(), d, device=DEV).to(dtype)
    got = torch.ops.moe.unpermute(y_ND, token_idx_N, w_N, t)
    assert got.dtype == dtype and got.shape == (t, d)
    assert_close(got, reference.unpermute(y_ND, token_idx_N, w_N, t))
    rows = torch.ops.moe.scatter_rows(y_ND, token_idx_N, t)
    assert_close(rows, reference.unpermute(y_ND, token_idx_N, torch.ones_like(w_N), t))
    # The CPU op sums each token's rows in the same (ascending row) order: bitwise for plain
    # sums, within fp32 rounding of a fused multiply-add for weighted ones.
    cpu = (y_ND.cpu(), token_idx_N.cpu())
    assert torch.equal(rows.cpu(), torch.ops.moe.scatter_rows(*cpu, t))
    tight = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    if dtype in (torch.float16, torch.bfloat16):
        tight = TOLERANCES[dtype]  # one rounding of the fp32 sum to 16 bits may flip either way
    torch.testing.assert_close(got.cpu(), torch.ops.moe.unpermute(*cpu, w_N.cpu(), t), **tight)


def test_unpermute_weights_in_other_dtypes_and_tokens_without_rows() -> None:
    t, d = 9, 16
    token_idx_N = torch.tensor([0, 3, 3, 8, 0], device=DEV)  # tokens 1, 2, 4-7 get nothing
    y_ND = torch.randn(5, d, device=DEV, dtype=torch.bfloat16)
    for w_N in (torch.rand(5, device=DEV, dtype=torch.float64), torch.rand(5, device=DEV).half()):
        got = torch.ops.moe.unpermute(y_ND, token_idx_N, w_N, t)
        assert_close(got, reference.unpermute(y_ND, token_idx_N, w_N, t))
        assert not got[[1, 2, 4, 5, 6, 7]].any()


def test_unpermute_token_with_many_rows() -> None:
    t, n, d = 3, 5000, 64
    token_idx_N = torch.cat([torch.ones(n - 2, dtype=torch.int64), torch.tensor([0, 2])]).to(DEV)
    y_ND, w_N = torch.randn(n, d, device=DEV, dtype=torch.float64), torch.rand(n, device=DEV, dtype=torch.float64)
    assert_close(torch.ops.moe.unpermute(y_ND, token_idx_N, w_N, t), reference.unpermute(y_ND, token_idx_N, w_N, t))


def test_grid_stride_loops_cover_every_row() -> None:
    """More rows and tokens than one launch's grid covers, so every kernel loops."""
    t, n, d = 20000, 2_200_000, 4
    token_idx_N = torch.randint(0, t, (n,), device=DEV)
    x_TD, w_N = torch.randn(t, d, device=DEV), torch.rand(n, device=DEV)
    y_ND = torch.ops.moe.permute(x_TD, token_idx_N)
    assert torch.equal(y_ND, reference.permute(x_TD, token_idx_N))
    assert_close(torch.ops.moe.unpermute(y_ND, token_idx_N, w_N, t), reference.unpermute(y_ND, token_idx_N, w_N, t))
    gy, gw = torch.ops.moe.unpermute_backward(x_TD, y_ND, token_idx_N, w_N)
    assert_close(gy, x_TD[token_idx_N] * w_N[:, None])
    assert_close(gw, (y_ND * y_ND).sum(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d,e,k,drop", ROW_CASES, ids=ROW_IDS)
def test_unpermute_backward_matches_reference_autograd(
    t: int, d: int, e: int, k: int, drop: float, dtype: torch.dtype
) -> None:
    token_idx_N, w_N = _dispatch_rows(t, k, e, drop)
    y_ND = torch.randn(token_idx_N.numel(), d, device=DEV).to(dtype).requires_grad_()
    w_N.requires_grad_()
    grad_out_TD = torch.randn(t, d, device=DEV).to(dtype)
    out = reference.unpermute(y_ND, token_idx_N, w_N, t)
    want_y, want_w = torch.autograd.grad(out, [y_ND, w_N], grad_out_TD) if t else (y_ND * 0, w_N * 0)
    got_y, got_w = torch.ops.moe.unpermute_backward(grad_out_TD, y_ND.detach(), token_idx_N, w_N.detach())
    assert got_y.dtype == dtype and got_w.dtype == w_N.dtype
    assert_close(got_y, want_y)
    # grad_w is a D-long dot product summed in fp32 (fp64) in another order than autograd's:
    # its rounding error grows like sqrt(D) times the fp32 (fp64) tolerance.
    tol = dict(TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32])
    tol["atol"] *= max(d, 1) ** 0.5
    torch.testing.assert_close(got_w, want_w, **tol)


def test_results_are_bitwise_deterministic() -> None:
    t, d, e, k = 4096, 256, 64, 8
    ids_TK, w_TK = _routing(t, k, e, drop=0.05)
    runs = []
    for _ in range(2):
        order, counts = torch.ops.moe.sort_by_expert(ids_TK, e)
        token_idx_N, w_N = order // k, w_TK.reshape(-1)[order]
        y_ND = torch.ops.moe.permute(
            torch.randn(t, d, device=DEV, generator=torch.Generator(DEV).manual_seed(1)), token_idx_N
        )
        out = torch.ops.moe.unpermute(y_ND, token_idx_N, w_N, t)
        rows = torch.ops.moe.scatter_rows(y_ND, token_idx_N, t)
        gy, gw = torch.ops.moe.unpermute_backward(out, y_ND, token_idx_N, w_N)
        runs.append((order, counts, y_ND, out, rows, gy, gw))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- checks, opcheck, the layer ----


def test_bad_input_raises_clear_errors() -> None:
    # Every message that carries a number: formatting one crashed the nvcc-built extension on the
    # H200 image (2026-12-04, SIGSEGV in std::ostream::_M_insert<long>); csrc/common.h's num() avoids that path.
    x = torch.randn(4, 8, device=DEV)
    idx = torch.tensor([0, 3], device=DEV)
    with pytest.raises(ValueError, match=r"x must be \[T, D\], got shape \[8\]$"):
        torch.ops.moe.permute(x[0], idx)
    with pytest.raises(TypeError, match="token_idx must be int64"):
        torch.ops.moe.permute(x, idx.int())
    with pytest.raises(ValueError, match="num_experts must be positive, got 0$"):
        torch.ops.moe.sort_by_expert(idx, 0)
    with pytest.raises(ValueError, match="block_size must be positive, got 0$"):
        torch.ops.moe.align_block_size(idx, 0)
    with pytest.raises(ValueError, match="token_idx has 2 rows but y has 4$"):
        torch.ops.moe.unpermute(x, idx, torch.rand(4, device=DEV), 4)
    with pytest.raises(ValueError, match=r"weights must be \[N\] = \[2\], got shape \[3\]$"):
        torch.ops.moe.unpermute(x[:2], idx, torch.rand(3, device=DEV), 4)
    with pytest.raises(RuntimeError, match="token_idx must be on cuda:0, got cpu"):
        torch.ops.moe.permute(x, idx.cpu())


def _registered(name: str) -> tuple[bool, bool]:
    """(fake kernel, autograd kernel) registered for moe::`name` (in C++ or from Python)."""
    qualname = f"moe::{name}"
    try:
        has_fake = torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None
    except AttributeError:
        has_fake = False
    has_fake = has_fake or torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")
    return has_fake, torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def test_opcheck_every_op() -> None:
    t, d, e, k = 13, 24, 5, 2
    token_idx_N, w_N = _dispatch_rows(t, k, e, drop=0.2)
    ids_TK, _ = _routing(t, k, e, drop=0.2)
    x_TD, y_ND, g_TD = (torch.randn(r, d, device=DEV) for r in (t, token_idx_N.numel(), t))
    cases = {  # op: (args, indices of the differentiable args)
        "sort_by_expert": ((ids_TK.reshape(-1), e), ()),
        "align_block_size": ((torch.tensor([3, 0, 5], device=DEV), 4), ()),
        "permute": ((x_TD, token_idx_N), (0,)),
        "scatter_rows": ((y_ND, token_idx_N, t), (0,)),
        "unpermute": ((y_ND, token_idx_N, w_N, t), (0, 2)),
        "unpermute_backward": ((g_TD, y_ND, token_idx_N, w_N), ()),
    }
    for name, (args, grad_args) in cases.items():
        has_fake, has_autograd = _registered(name)
        args = tuple(
            a.detach().requires_grad_(has_autograd and i in grad_args) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)
        )
        # Without a fake kernel only the eager checks can run (the fake ones are another file's job).
        utils = ("test_schema", "test_autograd_registration")
        if has_fake:
            utils += ("test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(getattr(torch.ops.moe, name).default, args, test_utils=utils)


def _layer_pair(dtype: torch.dtype) -> tuple[moe.MoE, moe.MoE]:
    if "cpp" not in moe.ops.backends_for("permute", torch.device(DEV)):
        pytest.skip("backend 'cpp' is not registered for CUDA in moe.ops")
    fast = moe.MoE(48, 80, 6, 2, num_shared_experts=1, backend="cpp").to(DEV, dtype)
    ref = moe.MoE(48, 80, 6, 2, num_shared_experts=1, backend="reference").to(DEV, dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_cpp_backend_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    fast, ref = _layer_pair(dtype)
    x = torch.randn(37, 48, device=DEV, dtype=dtype)
    outs, grads = [], []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        dy = torch.ones_like(y).mul_(0.1) + torch.arange(y.numel(), device=DEV).reshape(y.shape).to(dtype).sin()
        params = [xi, *layer.parameters()]
        g = torch.autograd.grad(y, params, dy, allow_unused=True)
        outs.append(y)
        grads.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True)])
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **tol)
