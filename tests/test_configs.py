"""The config family: validation errors, config -> layer round trips, old spellings still work."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import pytest
import torch

import moe
from moe.lora import LoRAMoEConfig, apply_lora_moe
from moe.offload import OffloadConfig, SyntheticConfig, synthetic_trace
from moe.parallel import Plan, PlannerConfig

# --- PlannerConfig / ParallelConfig / MoEConfig.parallel -------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk_options=()), "chunk_options"),
        (dict(chunk_options=(1, 0)), "chunk_options"),
        (dict(warmup=-1), "warmup must be >= 0"),
        (dict(samples=0), "samples must be >= 1"),
        (dict(check_every=0), "check_every"),
        (dict(recheck_every=0), "recheck_every"),
        (dict(max_samples=0), "max_samples"),
        (dict(runoff_margin=-0.1), "runoff_margin"),
        (dict(shift_threshold=float("nan")), "shift_threshold"),
    ],
)
def test_planner_config_errors_name_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlannerConfig(**kwargs)


def test_planner_config_is_the_one_class_and_positional_is_deprecated() -> None:
    assert moe.PlannerConfig is PlannerConfig is moe.config.PlannerConfig
    assert PlannerConfig(chunk_options=[1, 2]).chunk_options == (1, 2)  # type: ignore[arg-type]
    with pytest.warns(DeprecationWarning, match="keywords"):
        old = PlannerConfig((1, 2), 0, 1)  # type: ignore[misc]
    assert old == PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1)
    with pytest.raises(TypeError, match="multiple values"), pytest.warns(DeprecationWarning):
        PlannerConfig((1, 2), chunk_options=(1,))  # type: ignore[misc]


def test_parallel_config_errors() -> None:
    with pytest.raises(ValueError, match=r"plan: cannot parse plan 'ep\+x'"):
        moe.ParallelConfig(plan="ep+x")
    with pytest.raises(TypeError, match="plan must be"):
        moe.ParallelConfig(plan=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="planner must be a PlannerConfig"):
        moe.ParallelConfig(planner={"warmup": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_size must be >= 1"):
        moe.ParallelConfig(local_size=0)
    with pytest.raises(TypeError, match="parallel must be None or a ParallelConfig"):
        moe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, parallel="ep")  # type: ignore[arg-type]
    assert moe.ParallelConfig(plan=Plan(1, 2)).plan == Plan(1, 2)


def test_parallel_without_process_group_is_an_error() -> None:
    cfg = moe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, parallel=moe.ParallelConfig(plan="ep"))
    with pytest.raises(ValueError, match="process_group"):
        moe.MoE.from_config(cfg)
    with pytest.raises(ValueError, match="process_group"), pytest.warns(DeprecationWarning, match="parallel_plan"):
        moe.MoE(8, 4, 4, 2, parallel_plan="ep")


def _same_layers(a: moe.MoE, b: moe.MoE) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_moe_from_config_round_trip_single_process() -> None:
    cfg = moe.MoEConfig(
        dim=8,
        hidden_dim=4,
        num_experts=4,
        top_k=2,
        router="aux_free",
        router_config=moe.AuxFreeConfig(n_group=2, topk_group=1, group_score="max"),
        num_shared_experts=1,
        shared_expert_gate=True,
        capacity_factor=1.5,
        activation="gelu",
    )
    torch.manual_seed(0)
    built = moe.MoE.from_config(cfg)
    assert built.config == cfg
    torch.manual_seed(0)
    kw = moe.MoE(
        8, 4, 4, 2, "aux_free", num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.5,
        activation="gelu", n_group=2, topk_group=1, group_score="max",
    )  # fmt: skip
    _same_layers(built, kw)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(built(x), kw(x), rtol=0, atol=0)
    assert moe.MoE.from_config(built.config).config == cfg


def _ep_round_trip(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    parallel = moe.ParallelConfig(plan="ep/d=2", planner=PlannerConfig(chunk_options=(1, 2), warmup=0, samples=1))
    cfg = moe.MoEConfig(
        dim=6, hidden_dim=4, num_experts=4, top_k=2, router_config=moe.TopKConfig(), num_shared_experts=1,
        parallel=parallel,
    )  # fmt: skip
    torch.manual_seed(0)
    built = moe.MoE.from_config(cfg, process_group=group)
    assert built.config == cfg and built.parallel is not None
    assert moe.MoE.from_config(built.config, process_group=group).config == cfg
    torch.manual_seed(0)
    kw = moe.MoE(6, 4, 4, 2, num_shared_experts=1, process_group=group, parallel=parallel)
    _same_layers(built, kw)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="parallel_plan"):
        old = moe.MoE(6, 4, 4, 2, num_shared_experts=1, process_group=group, parallel_plan="ep/d=2",
                      planner_config=parallel.planner)  # fmt: skip
    _same_layers(built, old)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(rank))
    y = built(x)
    torch.testing.assert_close(y, kw(x), rtol=0, atol=0)
    torch.testing.assert_close(y, old(x), rtol=0, atol=0)
    assert str(built.parallel.last_plan) == "ep/d=2"
    # process_group alone: the adaptive defaults, written into the config
    assert moe.MoE(6, 4, 4, 2, process_group=group).config.parallel == moe.ParallelConfig()


@pytest.mark.distributed
def test_moe_from_config_builds_an_expert_parallel_layer() -> None:
    from test_parallel import _spawn

    _spawn(_ep_round_trip, 2)


# --- OffloadConfig / SyntheticConfig / offload.load(config=...) -------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="fifo"), "unknown policy 'fifo'"),
        (dict(policy="belady"), "offline"),
        (dict(scope="row"), "scope must be"),
        (dict(miss="never"), "miss must be"),
        (dict(lookahead=-1), "lookahead must be >= 0"),
        (dict(expert_cache_bytes=-1), "expert_cache_bytes must be >= 0"),
        (dict(ram_cache_bytes=-1), "ram_cache_bytes"),
    ],
)
def test_offload_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**{"expert_cache_bytes": 1 << 20, **kwargs})


def test_offload_config_positional_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="expert_cache_bytes=..., policy=..."):
        old = OffloadConfig(1024, "lfu", miss="copy")  # type: ignore[misc]
    assert old == OffloadConfig(expert_cache_bytes=1024, policy="lfu", miss="copy")
    with pytest.raises(TypeError, match="expert_cache_bytes"):
        OffloadConfig()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(reuse=1.5), "reuse must be in"),
        (dict(num_layers=0), "num_layers must be >= 1"),
        (dict(tokens=0), "tokens must be >= 1"),
        (dict(lookahead=-1), "lookahead must be >= 0"),
        (dict(zipf=-1.0), "zipf must be >= 0"),
        (dict(sharpness=0.0), "sharpness must be > 0"),
        (dict(top_k=65), "top_k"),
    ],
)
def test_synthetic_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


def test_synthetic_config_positional_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning):
        old = SyntheticConfig(3, 8, 2, 10)  # type: ignore[misc]
    new = SyntheticConfig(num_layers=3, num_experts=8, top_k=2, tokens=10)
    assert old == new
    assert torch.equal(synthetic_trace(old).experts_SM, synthetic_trace(new).experts_SM)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    path = str(tmp_path_factory.mktemp("tiny"))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    assert os.path.exists(os.path.join(path, "config.json"))
    return path


def test_offload_load_takes_a_config(tiny_model_dir: str) -> None:
    import moe.offload as mo

    budget = 4 * (16 * 16 + 8 * 16) * 4
    cfg = OffloadConfig(expert_cache_bytes=budget, policy="lfu", miss="copy", lookahead=2, record_trace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = mo.load(tiny_model_dir, "cpu", config=cfg)
    assert new.runtime.config == cfg
    with pytest.warns(DeprecationWarning, match="config=moe.offload.OffloadConfig"):
        old = mo.load(tiny_model_dir, "cpu", budget, "lfu", miss="copy", lookahead=2, record_trace=True)
    assert old.runtime.config == cfg
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(new.model(ids).logits, old.model(ids).logits)
    default = mo.load(tiny_model_dir, "cpu")
    assert default.runtime.config == OffloadConfig(expert_cache_bytes=1 << 30)
    with pytest.raises(TypeError, match="not both"):
        mo.load(tiny_model_dir, "cpu", budget, config=cfg)
    with pytest.raises(ValueError, match="unknown policy"), pytest.warns(DeprecationWarning):
        mo.load(tiny_model_dir, "cpu", budget, "fifo")
    for om in (new, old, default):
        om.runtime.store.close()


# --- LoRAMoEConfig ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(router="switch"), ValueError, "router must be"),
        (dict(rank=0), ValueError, "rank must be an int >= 1"),
        (dict(top_k=0), ValueError, "top_k must be"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (dict(mos_private_shards=-1), ValueError, "mos_private_shards must be an int >= 0"),
        (dict(compute="sparse"), ValueError, "compute must be"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(balance_coef=-1.0), ValueError, "balance_coef"),
        (dict(experts_per_layer=2.5), TypeError, "experts_per_layer"),
    ],
)
def test_lora_config_errors(kwargs: dict[str, Any], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        LoRAMoEConfig(**kwargs)


def _tiny() -> torch.nn.Module:
    from test_lora import tiny_llama

    return tiny_llama()


@pytest.mark.parametrize("router", ["topk", "dynmole", "mos"])
def test_apply_lora_moe_config_round_trip(router: str) -> None:
    targets = ["q_proj", "v_proj"]
    cfg = LoRAMoEConfig(experts_per_layer=[2, 2, 4, 4], rank=4, alpha=8.0, router=router, balance_coef=1e-3)  # type: ignore[arg-type]
    assert cfg.experts_per_layer == (2, 2, 4, 4) and hash(cfg)
    torch.manual_seed(0)
    a = apply_lora_moe(_tiny(), targets, config=cfg)
    torch.manual_seed(0)
    b = apply_lora_moe(_tiny(), targets, [2, 2, 4, 4], rank=4, alpha=8.0, router=router, balance_coef=1e-3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert dataclasses.replace(cfg, rank=2).rank == 2
    with pytest.raises(TypeError, match=r"not both"):
        apply_lora_moe(_tiny(), targets, rank=4, config=cfg)
