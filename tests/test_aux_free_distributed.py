"""Aux-free bias updates count loads over the whole data-parallel batch (2 gloo ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_layer() -> moe.MoE:
    torch.manual_seed(0)
    layer = moe.MoE(8, 16, 4, 1, "aux_free", bias_update_rate=0.1)
    with torch.no_grad():
        layer.router.weight.normal_()
    return layer


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 8, generator=g) + 1.0, torch.randn(10, 8, generator=g) - 1.0]


def _rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = _make_layer()
        layer(_batches()[rank])
        moe.update_routers(layer)
        out[rank] = layer.router.e_score_correction_bias.clone()
    finally:
        dist.destroy_process_group()


def test_bias_update_all_reduces_loads_across_ranks() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), out), nprocs=2, join=True)
        biases = [out[0], out[1]]
    single = _make_layer()
    single(torch.cat(_batches()))
    moe.update_routers(single)
    assert torch.equal(biases[0], biases[1])
    assert torch.equal(biases[0], single.router.e_score_correction_bias)
    local = _make_layer()  # what rank 0 would do without the all-reduce
    local(_batches()[0])
    moe.update_routers(local)
    assert not torch.equal(local.router.e_score_correction_bias, biases[0])
