"""The buffer pool of the C++ CPU ops (csrc/buffer_pool.cpp): outputs reuse freed buffers across
steps, never one that autograd (or anything else) still holds; results are those without reuse.

Shapes are chosen so that the layer's large outputs are >= 1 MiB (the pool's threshold).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import moe
from moe.cpu_memory import buffer_pool_stats, pooled_cat, pooled_empty, set_buffer_pool_limit
from moe.ops import cpp

pytest.importorskip("moe._C", reason="the C++ extension is not built")
assert cpp.loaded()

D, H, E, K = 128, 512, 4, 2  # T = 256: h [512, 1024] fp32 = 2 MiB


@pytest.fixture(autouse=True)
def _default_limit() -> Iterator[None]:
    torch.set_num_threads(2)
    set_buffer_pool_limit(None)
    yield
    set_buffer_pool_limit(None)


def _model(layers: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(*[moe.MoE(D, H, E, K, backend="cpp") for _ in range(layers)])


def _steps(model: nn.Module, token_counts: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Per step (output, input grad, every parameter grad); grads are set to None between steps."""
    out = []
    for i, t in enumerate(token_counts):
        x = torch.randn(t, D, generator=torch.Generator().manual_seed(i), requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        out.append((y.detach().clone(), x.grad, *[p.grad for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    return out


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    for step_a, step_b in zip(a, b, strict=True):
        for ta, tb in zip(step_a, step_b, strict=True):
            assert torch.equal(ta, tb)


@pytest.mark.parametrize("layers", [1, 2])
def test_reuse_across_steps_of_different_token_counts_changes_nothing(layers: int) -> None:
    counts = [256, 200, 256, 90, 256]
    set_buffer_pool_limit(0)  # no reuse: every output freshly allocated
    want = _steps(_model(layers), counts)
    set_buffer_pool_limit(None)
    before = buffer_pool_stats()
    got = _steps(_model(layers), counts)
    after = buffer_pool_stats()
    assert before is not None and after is not None
    assert after.reused > before.reused  # the pool did serve outputs
    _same(got, want)


def test_steady_state_allocates_nothing_fresh() -> None:
    model = _model(1)
    set_buffer_pool_limit(1 << 30)  # room for every distinct buffer the step needs
    _steps(model, [256, 256])
    start = buffer_pool_stats()
    _steps(model, [256, 256])
    end = buffer_pool_stats()
    assert start is not None and end is not None
    assert end.fresh == start.fresh and end.reused > start.reused


def test_buffers_autograd_holds_are_not_reused() -> None:
    """Step 1's graph (its saved activations) stays alive while step 2 runs forward and backward."""
    model = _model(2)
    xs = [torch.randn(256, D, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    set_buffer_pool_limit(0)
    want = []
    for x in xs:
        model(x).square().sum().backward()
        want.append(x.grad.clone())
        x.grad = None
    set_buffer_pool_limit(None)
    y1 = model(xs[0])  # graph kept
    model(xs[1]).square().sum().backward()  # frees step 2's buffers into the pool ...
    model(xs[1]).square().sum().backward()  # ... and takes them again
    y1.square().sum().backward()
    assert torch.equal(xs[0].grad, want[0])
    assert torch.equal(xs[1].grad, 2 * want[1])


def test_limit_zero_keeps_nothing_and_bad_limits_raise() -> None:
    _steps(_model(1), [256])
    set_buffer_pool_limit(0)
    stats = buffer_pool_stats()
    assert stats is not None and stats.free_bytes == 0 and stats.limit == 0
    with pytest.raises(ValueError, match="limit_bytes must be None or an int >= 0, got -5"):
        set_buffer_pool_limit(-5)


def test_default_limit_bounds_live_plus_free_bytes() -> None:
    _steps(_model(2), [256, 200, 256])
    stats = buffer_pool_stats()
    assert stats is not None and stats.limit == -1
    assert stats.live_bytes + stats.free_bytes <= stats.high_water_bytes * 2


def test_two_alternating_shapes_keep_their_buffers() -> None:
    # Live at once: 3 x 4 MiB (A) or 3 x 3 MiB (B); both sets, 21 MiB, fit in twice the 12 MiB
    # high-water mark (an EP layer switching between its plain and pipelined paths does this).
    set_buffer_pool_limit(0)  # drop the free buffers of earlier tests
    set_buffer_pool_limit(None)
    like = torch.zeros(1)
    fresh = []
    for _ in range(6):
        for mib in (4, 3):
            held = [pooled_empty((mib << 18,), like) for _ in range(3)]
            del held
        stats = buffer_pool_stats()
        assert stats is not None
        fresh.append(stats.fresh)
    assert fresh[-1] == fresh[0], f"buffers allocated fresh after the first round: {fresh}"


def test_pooled_empty_reuses_a_freed_buffer_of_its_size() -> None:
    like = torch.zeros(1, dtype=torch.bfloat16)
    set_buffer_pool_limit(0)  # drop the free buffers of earlier tests
    set_buffer_pool_limit(None)
    a = pooled_empty((1024, 1024), like)  # 2 MiB
    assert a.shape == (1024, 1024) and a.dtype == torch.bfloat16 and a.device.type == "cpu"
    address = a.data_ptr()
    del a
    b = pooled_empty((1024, 1024), like)
    assert b.data_ptr() == address
    c = pooled_empty((1024, 1024), like)  # b is alive: never the same buffer
    assert c.data_ptr() != b.data_ptr()


def test_pooled_cat_matches_torch_cat_and_reuses_its_buffer() -> None:
    set_buffer_pool_limit(0)  # drop the free buffers of earlier tests
    set_buffer_pool_limit(None)
    torch.manual_seed(0)
    parts = [torch.randn(rows, 1024, dtype=torch.float64, requires_grad=True) for rows in (100, 0, 156)]
    out = pooled_cat(parts)
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    for p, g in zip(parts, grad.split([100, 0, 156]), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    address = out.data_ptr()  # 2 MiB: pooled
    del out
    with torch.no_grad():
        again = pooled_cat(parts)
    assert again.data_ptr() == address, "the second cat of the same size took a fresh buffer"
    assert pooled_cat(parts[:1]) is parts[0]
    with pytest.raises(ValueError, match="at least one"):
        pooled_cat([])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_allocate_while_other_threads_use_the_pool() -> None:
    """fork() while another thread allocates and frees pooled buffers (as a DataLoader's workers
    fork mid-training): the pool's fork handlers take its lock around fork() and release it on
    both sides, so neither the fork nor the child's first pooled allocation hangs. (The race the
    handlers close, a lock copied while another thread held it, needs a thread inside the pool
    without the GIL at the moment of the fork; from Python it did not occur in 60 forks without
    the handlers either.)"""
    like = torch.zeros(1)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            buf = pooled_empty((1 << 18,), like)  # 1 MiB: pooled
            del buf

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # child: allocate from the pool, then leave without running any cleanup
                ok = pooled_empty((1 << 18,), like).numel() == 1 << 18
                os._exit(0 if ok else 1)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail("a forked child hung on its first pooled allocation")
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        stop.set()
        worker.join()
