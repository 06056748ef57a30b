"""Pyramid models (DeepSpeed-MoE's PR-MoE): MoE layers with different expert counts and top-k in one
model, through the paths that used to assume one count: offload budgets and runtime, EP checkpoints
resharded at another EP size, bad pyramids (an expert count the EP size does not split) refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moe
import moe.offload as mo
from moe.parallel import load_checkpoint, save_checkpoint

D, H = 8, 4
PYRAMID = ((2, 1), (4, 2), (8, 2))  # (num_experts, top_k) per layer


class Net(nn.Module):
    def __init__(self, pyramid: tuple[tuple[int, int], ...] = PYRAMID, residual: bool = True, **kw: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(moe.MoE(D, H, e, k, residual=residual, **kw) for e, k in pyramid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_offload_pyramid_budget_split_by_expert_count_and_outputs() -> None:
    net = Net().eval()
    x = torch.randn(5, D)
    with torch.no_grad():
        want = net(x)
    layers = list(net.layers)
    shapes = {i: mo.ExpertShape(D, H, 2 * H) for i in range(len(layers))}
    weights = [(m.experts.w_in.detach().clone(), m.experts.w_out.detach().clone()) for m in layers]

    def read(key: tuple[int, int], out: torch.Tensor) -> None:
        w_in, w_out = shapes[key[0]].views(out)
        w_in.copy_(weights[key[0]][0][key[1]])
        w_out.copy_(weights[key[0]][1][key[1]])

    store = mo.ExpertStore(read, shapes, torch.float32, "cpu", ram_cache_bytes=0)
    one = store.expert_bytes(0)
    config = mo.OffloadConfig(expert_cache_bytes=14 * one, policy="lru", miss="copy")
    runtime = mo.OffloadRuntime(store, config, [m.router for m in layers], [m.config.num_experts for m in layers])
    try:
        # 14 experts' bytes split 2 : 4 : 8 -> 2, 4, 8: every layer holds all of its experts.
        assert [runtime.residency.budget_of((i, 0)) // one for i in range(3)] == [2, 4, 8]
        for i, m in enumerate(layers):
            c = m.config
            m.experts = mo.OffloadedExperts(runtime, i, c.num_experts, D, H, torch.float32, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(net(x), want)
            copies = runtime.residency.stats.copies
            torch.testing.assert_close(net(x), want)  # second pass: all hits, nothing evicted
        assert copies > 0 and runtime.residency.stats.copies == copies
    finally:
        store.close()
    # An even split (the old behaviour) would have given each layer 4 experts: the 8-expert layer thrashes.
    with pytest.raises(mo.BudgetError, match="split over MoE layers by expert count"):
        store2 = mo.ExpertStore(read, shapes, torch.float32, "cpu", ram_cache_bytes=0)
        try:
            mo.OffloadRuntime(
                store2, mo.OffloadConfig(expert_cache_bytes=5 * one), [m.router for m in layers], [2, 4, 8]
            )
        finally:
            store2.close()


def test_uniform_models_keep_the_even_split() -> None:
    from moe.offload.cache import Residency
    from moe.offload.policies import LRU

    res = Residency(90, LRU(), 3)
    assert res.pool_budgets == {} and res.budget_of((2, 0)) == 30
    res = Residency(90, LRU(), 3, layer_shares=[1.0, 2.0, 3.0])
    assert [res.budget_of((i, 0)) for i in range(3)] == [15, 30, 45]
    with pytest.raises(ValueError, match="layer_shares"):
        Residency(90, LRU(), 3, layer_shares=[1.0, 2.0])


def test_single_process_checkpoint_rejects_another_pyramid(tmp_path: Path) -> None:
    net = Net()
    save_checkpoint(net, tmp_path / "p.safetensors")
    other = Net(((2, 1), (8, 2), (8, 2)))
    with pytest.raises(ValueError, match="holds 4 experts for layers.1.experts, the model has 8"):
        load_checkpoint(other, tmp_path / "p.safetensors")
    again = Net()
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    load_checkpoint(again, tmp_path / "p.safetensors")
    x = torch.randn(3, D)
    torch.testing.assert_close(again(x), net(x))


# --- expert parallelism on 2 gloo ranks -----------------------------------------------------


def _ep_pyramid_rank(rank: int, world: int, path: str) -> None:
    group = dist.group.WORLD
    single = Net().double()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want = single(x)
    # one process -> file -> EP 2 (each layer resharded: 1, 2 and 4 experts per rank)
    if rank == 0:
        save_checkpoint(single, path)
    dist.barrier()
    ep = Net(process_group=group).double()
    assert [m.experts.stored.num_experts for m in ep.layers] == [1, 2, 4]
    load_checkpoint(ep, path)
    with torch.no_grad():
        torch.testing.assert_close(ep(x), want, rtol=1e-6, atol=1e-8)  # the router computes in fp32
    # EP 2 -> file -> one process
    with torch.no_grad():
        for m in ep.layers:
            m.experts.w_in.mul_(1.5)
        want2 = ep(x)
    save_checkpoint(ep, path + ".ep2")
    dist.barrier()
    back = Net().double()
    load_checkpoint(back, path + ".ep2")
    with torch.no_grad():
        torch.testing.assert_close(back(x), want2, rtol=1e-6, atol=1e-8)
    # a pyramid whose expert count the EP size cannot split: a clear error when the layer is built
    with pytest.raises(ValueError, match=r"num_experts \(3\) divisible by the world size \(2\)"):
        moe.MoE(D, 3, 3, 1, process_group=group)


def _planner_pyramid_rank(rank: int, world: int, path: str) -> None:
    """Each layer of a pyramid (1, 2 and 4 experts per rank) runs its own adaptive planner; while
    they explore and after they settle, every step equals one process on the global batch:
    outputs, input and parameter gradients."""
    from moe.parallel import PlannerConfig

    group = dist.group.WORLD
    single = Net().double()
    if rank == 0:
        save_checkpoint(single, path)
    dist.barrier()
    cfg = PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1, check_every=1)
    ep = Net(process_group=group, planner_config=cfg).double()
    load_checkpoint(ep, path)
    candidates = [list(m.parallel.planner.candidates) for m in ep.layers]
    used: list[set] = [set() for _ in ep.layers]
    g = torch.Generator().manual_seed(2)
    tol = dict(rtol=1e-6, atol=1e-8)  # the router computes in fp32 by design
    for step in range(max(len(c) for c in candidates) + 2):
        x_all = torch.randn(4 * world, D, generator=g, dtype=torch.float64, requires_grad=True)
        w_all = torch.randn(4 * world, D, generator=g, dtype=torch.float64)
        single.zero_grad(set_to_none=True)
        (single(x_all) * w_all).sum().backward()
        mine = slice(4 * rank, 4 * rank + 4)
        x = x_all.detach()[mine].clone().requires_grad_()
        ep.zero_grad(set_to_none=True)
        y = ep(x)
        for i, m in enumerate(ep.layers):
            used[i].add(m.parallel.last_plan)
        (y * w_all[mine]).sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(y, single(x_all.detach())[mine], **tol, msg=f"step {step}: output")
        torch.testing.assert_close(x.grad, x_all.grad[mine], **tol, msg=f"step {step}: input grad")
        for i, (mp_, ms) in enumerate(zip(ep.layers, single.layers, strict=True)):
            want_in, want_out = _shard_of(mp_, ms.experts.w_in.grad, ms.experts.w_out.grad)
            torch.testing.assert_close(mp_.experts.w_in.grad, want_in, **tol, msg=f"step {step} layer {i}: w_in")
            torch.testing.assert_close(mp_.experts.w_out.grad, want_out, **tol, msg=f"step {step} layer {i}: w_out")
            for (name, p), q in zip(mp_.named_parameters(), ms.parameters(), strict=True):
                if name.startswith("experts."):
                    continue
                grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(grad)  # replicated (router, dense branch): summed over ranks
                torch.testing.assert_close(grad, q.grad, **tol, msg=f"step {step} layer {i}: {name}")
    for i, cands in enumerate(candidates):  # each layer's planner ran every plan it had
        assert used[i] == set(cands), (i, used[i], cands)


def _shard_of(layer: moe.MoE, w_in: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's shard of a single process's full expert tensors, laid out as `layer` stores them."""
    cfg = layer.config
    probe = moe.parallel.ParallelExperts(cfg.num_experts, D, H, cfg.activation, "auto", dist.group.WORLD).double()
    probe.load_global(w_in, w_out)
    return probe.w_in.detach(), probe.w_out.detach()


def _ep_pyramid(rank: int, world: int, path: str) -> None:
    _ep_pyramid_rank(rank, world, path)
    _planner_pyramid_rank(rank, world, path + ".planner")


@pytest.mark.distributed
def test_ep_pyramid_checkpoints_reshard_and_plan_per_layer(tmp_path: Path) -> None:
    from test_parallel import _spawn

    _spawn(_ep_pyramid, 2, str(tmp_path / "pyr.safetensors"))


def test_deepspeed_prepare_names_the_layer_of_a_bad_pyramid() -> None:
    pytest.importorskip("deepspeed")
    from moe.integrations.deepspeed import _check_preparable

    net = Net(((2, 1), (6, 2)))
    _check_preparable("layers.0", net.layers[0], 2)
    with pytest.raises(ValueError, match=r"layers.1: num_experts \(6\) must be divisible by ep_size \(4\)"):
        _check_preparable("layers.1", net.layers[1], 4)


# --- Hugging Face patching ------------------------------------------------------------------


def test_hf_patch_and_unpatch_of_a_pyramid_mixtral() -> None:
    """HF configs give one expert count per model; a pyramid built from it (layer 1's block swapped
    for one with 8 experts, top-3) patches layer by layer from each block's own weights and
    unpatches back, with equal logits."""
    transformers = pytest.importorskip("transformers")
    from hf_tiny import tiny_config

    from moe.integrations.transformers import patch, unpatch

    torch.manual_seed(0)
    cfg = tiny_config("mixtral")
    model = transformers.MixtralForCausalLM(cfg).eval()
    wide = cfg.__class__(**{**cfg.to_dict(), "num_local_experts": 8, "num_experts_per_tok": 3})
    block = type(model.model.layers[1].mlp)(wide)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    model.model.layers[1].mlp = block
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    assert patch(model) == 2
    layers = [layer.mlp.moe for layer in model.model.layers]
    assert [(m.config.num_experts, m.config.top_k) for m in layers] == [(6, 2), (8, 3)]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert unpatch(model) == 2
    assert type(model.model.layers[1].mlp) is type(block)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
