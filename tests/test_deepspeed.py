"""DeepSpeed plugin on 2 gloo ranks (CPU): ZeRO 0/1/2 with ep_size 2 vs one process, checkpoints, guards.

All scenarios run inside ONE pair of spawned ranks (importing DeepSpeed + torch._dynamo costs
~10 s per process); each scenario's outcome is written to a file and asserted by its own test.
DeepSpeed's shared-memory CPU op is never JIT-built (moe_ds.skip_cpu_comm_build()).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import moe
from moe.parallel import load_checkpoint

deepspeed = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.distributed

WORLD, D, H, E, K = 2, 6, 8, 4, 2
BATCH = 3  # sequences per rank
SEQ = 4
STEPS = 2
LR = 0.05


class Net(nn.Module):
    """in-proj -> MoE (shared expert, gated) -> out-proj (fp32: DeepSpeed reduces no fp64 grads)."""

    def __init__(self, seed: int, **moe_kw: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.moe = moe.MoE(D, H, E, K, num_shared_experts=1, shared_expert_gate=True, aux_loss_coef=0.0, **moe_kw)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.moe(torch.tanh(self.inp(x))))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: [WORLD * BATCH, SEQ, D] inputs and targets."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(
        WORLD * BATCH,
        SEQ,
        D,
        generator=g,
    )
    return x, torch.randn(x.shape, generator=g)


def _config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }


def _reference(steps: int, net: nn.Module | None = None) -> tuple[list[float], nn.Module]:
    """The same model (default Net(0)) and data in one process, torch.optim.AdamW: losses and final weights."""
    net = Net(0) if net is None else net
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(steps):
        x, t = _data(step)
        loss = (net(x) - t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net


def _train_step(engine: Any, rank: int, step: int) -> float:
    x, t = _data(step)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    loss = (engine(x[mine]) - t[mine]).pow(2).mean()
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / WORLD


def _check_weights(engine: Any, ref: Net, tol: dict[str, float]) -> None:
    layer = engine.module.moe
    first, count = layer.experts.stored.first_expert, layer.experts.stored.num_experts
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters(), strict=True):
        want = q.detach()[first : first + count] if name.startswith("moe.experts.") else q.detach()
        torch.testing.assert_close(p.detach(), want, **tol, msg=name)


def _engine(moe_ds: Any, stage: int, seed: int = 0, ep_size: int = 2) -> Any:
    engine, _, _, _ = moe_ds.initialize(Net(seed), _config(stage), ep_size=ep_size, plan="ep")
    return engine


# --- scenarios (run on every rank) ---------------------------------------------------------------


def zero_matches_single_process(rank: int, moe_ds: Any, tmp: Path) -> None:
    ref_losses, ref = _reference(STEPS)
    for stage in (0, 1, 2):
        engine = _engine(moe_ds, stage)
        assert engine.has_moe_layers and isinstance(engine.module.moe, deepspeed.moe.layer.MoE)
        losses = [_train_step(engine, rank, s) for s in range(STEPS)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        _check_weights(engine, ref, dict(rtol=1e-4, atol=1e-5))


def checkpoint_resumes_exactly(rank: int, moe_ds: Any, tmp: Path) -> None:
    for stage in (0, 2):
        a = _engine(moe_ds, stage)
        for s in range(STEPS):
            _train_step(a, rank, s)
        a.save_checkpoint(str(tmp / f"ck{stage}"), tag="t")
        b = _engine(moe_ds, stage, seed=7)  # different initial weights
        path, _ = b.load_checkpoint(str(tmp / f"ck{stage}"), tag="t")
        assert path is not None
        assert b.global_steps == a.global_steps
        la, lb = _train_step(a, rank, STEPS), _train_step(b, rank, STEPS)
        assert la == lb, (la, lb)
        for (name, p), q in zip(a.module.named_parameters(), b.module.parameters(), strict=True):
            assert torch.equal(p, q), name


def checkpoint_other_ep_size_and_export(rank: int, moe_ds: Any, tmp: Path) -> None:
    a = _engine(moe_ds, 2)
    _train_step(a, rank, 0)
    a.save_checkpoint(str(tmp / "ep2"), tag="t")
    names = sorted(os.listdir(tmp / "ep2" / "t"))
    assert [n for n in names if n.startswith("layer_0_expert_")] == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(E)
    ]
    x, _ = _data(5)
    with torch.no_grad():
        want = a(x)  # every rank runs the whole batch
    # ep_size 1: every rank holds all 4 experts; module weights come from the per-expert files.
    c = _engine(moe_ds, 2, seed=3, ep_size=1)
    c.load_checkpoint(str(tmp / "ep2"), tag="t", load_optimizer_states=False, load_module_only=True)
    assert c.module.moe.experts.w_in.shape[0] == E
    with torch.no_grad():
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-6)
    # export: plain safetensors by global expert id, loads into a model that never saw DeepSpeed.
    moe_ds.export_safetensors(a, tmp / "model.safetensors")
    plain = Net(5)
    load_checkpoint(plain, tmp / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-6)
    moe_ds.load_safetensors(c, tmp / "model.safetensors")  # and back into an engine at ep_size 1
    with torch.no_grad():
        torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-6)
    d = _engine(moe_ds, 2, seed=9)  # ZeRO 2 keeps fp32 masters: load_safetensors must refresh them
    moe_ds.load_safetensors(d, tmp / "model.safetensors")
    loaded = [p.detach().clone() for p in d.module.parameters()]
    _train_step(d, rank, 0)
    for p, q in zip(d.module.parameters(), loaded, strict=True):
        assert float((p - q).abs().max()) <= 1.01 * LR  # one Adam step from the loaded weights


def unprepared_is_refused(rank: int, moe_ds: Any, tmp: Path) -> None:
    ep_group = dist.new_group([0, 1])
    sharded = Net(0, process_group=ep_group)  # expert-parallel but never prepared
    with pytest.raises(ValueError, match="prepare"):
        deepspeed.initialize(model=sharded, config=_config(2), model_parameters=list(sharded.parameters()))
    plain = Net(0)  # plain layers: the engine sees a dense model; the guard says so
    engine, _, _, _ = deepspeed.initialize(model=plain, config=_config(1), model_parameters=list(plain.parameters()))
    with pytest.raises(ValueError, match="not prepared"):
        moe_ds.check(engine)
    with pytest.raises(ValueError, match="ZeRO stage 3.*stage 1 or 2"):
        moe_ds.initialize(Net(0), _config(3), ep_size=2)
    merged = _engine(moe_ds, 1)
    with torch.no_grad():  # what an unmarked layer suffers: rank 0's experts copied onto rank 1
        for p in (merged.module.moe.experts.w_in, merged.module.moe.experts.w_out):
            dist.broadcast(p, src=0)
    with pytest.raises(ValueError, match="identical expert weights"):
        moe_ds.check(merged)
    with pytest.raises(ValueError, match="wrap it in a module"):  # its keys would start with '.'
        moe_ds.prepare(moe.MoE(D, H, E, K), ep_size=2)
    odd = Net(0)
    odd.moe.router.register_buffer("expert_bias", torch.zeros(E))  # DeepSpeed would take it for an expert
    with pytest.raises(ValueError, match="expert_bias"):
        moe_ds.prepare(odd, ep_size=2)
    upcycled = _engine(moe_ds, 1)
    with torch.no_grad():  # sparse upcycling: every expert a copy of one dense MLP, on every rank
        for p in (upcycled.module.moe.experts.w_in, upcycled.module.moe.experts.w_out):
            p.copy_(torch.linspace(-1, 1, p[0].numel()).view_as(p[0]).expand_as(p))
    moe_ds.check(upcycled)  # legitimate: no error


class NativeNet(nn.Module):
    """The migration case: a model built on deepspeed.moe.layer.MoE (tuple output, l_aux)."""

    def __init__(self, use_residual: bool = False, seed: int = 0) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        expert = nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU(), nn.Linear(H, D, bias=False))
        self.moe = DSMoE(
            D,
            expert,
            num_experts=E,
            k=2,
            drop_tokens=False,
            min_capacity=0,
            top2_2nd_expert_sampling=False,
            use_residual=use_residual,
        )
        with torch.no_grad():  # experts (and the residual mlp and coefficient) all differ
            for p in self.moe.parameters() if use_residual else self.moe.deepspeed_moe.experts.parameters():
                p.normal_(0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return y + 0.0 * l_aux


def converted_deepspeed_model_trains(rank: int, moe_ds: Any, tmp: Path, use_residual: bool = False) -> Any:
    from moe.integrations.deepspeed_convert import convert

    ref = NativeNet(use_residual)  # DeepSpeed's own layer, one process, the whole batch
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    ref_losses = []
    for step in range(STEPS):
        x, t = _data(step)
        loss = (ref(x) - t).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    model = NativeNet(use_residual)
    assert convert(model) == 1
    engine, _, _, _ = moe_ds.initialize(model, _config(2), ep_size=2, plan="ep")
    losses = [_train_step(engine, rank, s) for s in range(STEPS)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.module.inp.weight, ref.inp.weight, **tol)
    torch.testing.assert_close(engine.module.moe.router.weight, ref.moe.deepspeed_moe.gate.wg.weight, **tol)
    if use_residual:
        torch.testing.assert_close(engine.module.moe.residual_coef.weight, ref.moe.coefficient.weight, **tol)
        torch.testing.assert_close(engine.module.moe.residual_coef.bias, ref.moe.coefficient.bias, **tol)
        torch.testing.assert_close(engine.module.moe.residual_mlp.up_proj.weight, ref.moe.mlp[0].weight, **tol)
    return engine


def converted_residual_moe_trains_and_reshards(rank: int, moe_ds: Any, tmp: Path) -> None:
    """DeepSpeed's Residual MoE (use_residual=True), converted: ZeRO 2 at ep_size 2 matches DeepSpeed's
    own layer in one process; its engine checkpoint (dense branch replicated) loads at ep_size 1."""
    from moe.integrations.deepspeed_convert import convert

    a = converted_deepspeed_model_trains(rank, moe_ds, tmp, use_residual=True)
    assert a.module.moe.use_residual and a.module.moe.residual_mlp is not None
    a.save_checkpoint(str(tmp / "residual"), tag="t")
    x, _ = _data(5)
    with torch.no_grad():
        want = a(x)
    other = NativeNet(True, seed=4)
    convert(other)
    b, _, _, _ = moe_ds.initialize(other, _config(2), ep_size=1)
    b.load_checkpoint(str(tmp / "residual"), tag="t", load_optimizer_states=False, load_module_only=True)
    with torch.no_grad():
        torch.testing.assert_close(b(x), want, rtol=1e-5, atol=1e-6)


class PyramidNet(nn.Module):
    """Two residual MoE layers with 2 and 4 experts (top-1, top-2): a PR-MoE pyramid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.lower = moe.MoE(D, H, 2, 1, residual=True, aux_loss_coef=0.0)
        self.upper = moe.MoE(D, H, 4, 2, residual=True, aux_loss_coef=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        x = x + self.lower(x)
        return x + self.upper(x)


def pyramid_trains_and_reshards(rank: int, moe_ds: Any, tmp: Path) -> None:
    """A pyramid (2 then 4 experts, residual) at ep_size 2 under ZeRO 2 matches one process; its
    engine checkpoint loads at ep_size 1; a pyramid whose count ep_size does not divide is refused."""
    ref_losses, _ = _reference(STEPS, PyramidNet())
    engine, _, _, _ = moe_ds.initialize(PyramidNet(), _config(2), ep_size=2, plan="ep")
    assert [engine.module.lower.num_local_experts, engine.module.upper.num_local_experts] == [1, 2]
    losses = [_train_step(engine, rank, s) for s in range(STEPS)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
    engine.save_checkpoint(str(tmp / "pyramid"), tag="t")
    x, _ = _data(5)
    with torch.no_grad():
        want = engine(x)
    other, _, _, _ = moe_ds.initialize(PyramidNet(), _config(2), ep_size=1)
    other.load_checkpoint(str(tmp / "pyramid"), tag="t", load_optimizer_states=False, load_module_only=True)
    with torch.no_grad():
        torch.testing.assert_close(other(x), want, rtol=1e-5, atol=1e-6)
    bad = PyramidNet()
    bad.upper = moe.MoE(D, H, 3, 1, residual=True)
    with pytest.raises(ValueError, match=r"upper: num_experts \(3\) must be divisible by ep_size \(2\)"):
        moe_ds.prepare(bad, ep_size=2)


SCENARIOS: list[Callable[[int, Any, Path], Any]] = [
    converted_deepspeed_model_trains,
    converted_residual_moe_trains_and_reshards,
    pyramid_trains_and_reshards,
    zero_matches_single_process,
    checkpoint_resumes_exactly,
    checkpoint_other_ep_size_and_export,
    unprepared_is_refused,
]


def _rank_main(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    from moe.integrations import deepspeed as moe_ds

    moe_ds.skip_cpu_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=90))
    results = {}
    for scenario in SCENARIOS:
        try:
            scenario(rank, moe_ds, Path(tmp))
            results[scenario.__name__] = "ok"
        except Exception:  # recorded, asserted by the test of that scenario
            results[scenario.__name__] = traceback.format_exc()
        dist.barrier()
    Path(tmp, f"results{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(port, str(tmp)), nprocs=WORLD, join=True)
    return [json.loads(Path(tmp, f"results{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_deepspeed(results: list[dict[str, str]], scenario: str) -> None:
    for rank, res in enumerate(results):
        assert res[scenario] == "ok", f"rank {rank}:\n{res[scenario]}"


def test_import_moe_without_deepspeed_import() -> None:
    import subprocess
    import sys

    code = "import sys, moe; assert 'deepspeed' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_example_trains_with_torchrun(tmp_path: Path) -> None:
    """examples/deepspeed_train.py under torchrun (2 CPU ranks, gloo): trains, exports, loads without DeepSpeed."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    export = tmp_path / "tiny.safetensors"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += [str(root / "examples" / "deepspeed_train.py"), "--steps", "12", "--layers", "1", "--dim", "32"]
    cmd += ["--experts", "4", "--seq-len", "32", "--train-bytes", "100000", "--export", str(export)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "held-out loss" in out.stdout and "ep_size 2" in out.stdout
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_lm", root / "examples" / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    tiny_lm = importlib.util.module_from_spec(spec)
    sys.modules["tiny_lm"] = tiny_lm  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(tiny_lm)
        cfg = tiny_lm.TinyLMConfig(dim=32, num_layers=1, num_experts=4, top_k=2, expert_hidden_dim=32, max_seq_len=32)
        model = tiny_lm.TinyLM(cfg)
        load_checkpoint(model, export)  # every global expert is in the file
        logits = model(torch.randint(0, 256, (2, 16)))
        assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
    finally:
        sys.modules.pop("tiny_lm", None)
