"""Expert parallelism under NCCL on one GPU (world size 1): the CUDA side of moe.parallel.

One rank cannot show the exchange across GPUs, but it runs every NCCL call the layer makes
(config check, all_to_all, all_gather of the planner, checkpoint gather) on CUDA tensors, so a
CPU tensor handed to NCCL, or a host sync where none should be, shows up here. Skips itself
without a CUDA device or NCCL (`make gpu` runs it).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moe
from moe.parallel import Plan, PlannerConfig, load_checkpoint, save_checkpoint
from moe.parallel.layout import valid_modes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()),
        reason="needs a CUDA device and NCCL",
    ),
]

D, H, E, K = 16, 8, 4, 2
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def nccl() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    yield
    dist.destroy_process_group()


def _layers(**kw: object) -> tuple[moe.MoE, moe.MoE]:
    torch.manual_seed(0)
    single = moe.MoE(D, H, E, K, num_shared_experts=1).cuda()
    layer = moe.MoE(D, H, E, K, num_shared_experts=1, process_group=dist.group.WORLD, **kw).cuda()  # type: ignore[arg-type]
    layer.load_state_dict({k: v for k, v in single.state_dict().items() if not k.startswith("experts.")}, strict=False)
    layer.experts.load_global(single.experts.w_in.detach(), single.experts.w_out.detach())
    return single, layer


def _step(layer: moe.MoE, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad


def test_every_mode_and_degree_matches_one_process(nccl: None) -> None:
    single, layer = _layers(parallel_plan="ep")
    x, g = torch.randn(33, D, device="cuda"), torch.randn(33, D, device="cuda")
    y_ref, dx_ref = _step(single, x, g)
    for mode in valid_modes(E, H, 1):
        for d in (1, 2):
            layer.parallel.pin(Plan(mode, d))
            y, dx = _step(layer, x, g)
            torch.testing.assert_close(y, y_ref, **TOL, msg=f"{Plan(mode, d)}: output")
            torch.testing.assert_close(dx, dx_ref, **TOL, msg=f"{Plan(mode, d)}: input grad")
            assert layer.experts.w_in.grad is not None and single.experts.w_in.grad is not None
            torch.testing.assert_close(layer.experts.w_in.grad, single.experts.w_in.grad, **TOL)


def test_planner_explores_and_reports_on_cuda(nccl: None) -> None:
    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1, check_every=2)
    _, layer = _layers(planner_config=cfg)
    x, g = torch.randn(64, D, device="cuda"), torch.randn(64, D, device="cuda")
    for _ in range(len(layer.parallel.planner.candidates) + 4 + 3):  # exploration, a possible run-off, pick
        _step(layer, x, g)
    report = layer.parallel.report()
    assert not report["exploring"] and report["plan"] in report["candidates"], report


def test_checkpoint_round_trips_from_cuda(nccl: None, tmp_path: Path) -> None:
    single, layer = _layers(parallel_plan="ep")
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(layer, path)
    torch.manual_seed(1)
    fresh = moe.MoE(D, H, E, K, num_shared_experts=1)
    load_checkpoint(fresh, path)
    for (name, a), b in zip(single.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name
