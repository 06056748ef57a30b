"""Offloading quantized experts (moe.offload with expert_quant): tokens equal the in-memory model
whose experts are moe.quant.QuantizedExperts, only quantized bytes are counted and moved, bad input
gets clear errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe  # noqa: E402
import moe.offload as mo  # noqa: E402
from moe.integrations.transformers import patch  # noqa: E402
from moe.offload.quantized import QuantizedExpertShape  # noqa: E402
from moe.quant import QuantizedExperts, matmul_path, quantize  # noqa: E402

D, I_MOE, E, LAYERS, G = 64, 32, 4, 2, 32
PROMPT = torch.tensor([[3, 17, 42, 5, 9]])
NEW_TOKENS = 10


def _qbytes(scheme: str) -> int:
    w_in, w_out = torch.randn(1, D, 2 * I_MOE), torch.randn(1, I_MOE, D)
    return quantize(w_in, scheme, G).nbytes + quantize(w_out, scheme, G).nbytes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_local_experts=E,
        num_experts_per_tok=2,
        intermediate_size=I_MOE,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # spread router logits: no near-ties in greedy routing
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == E:
                p.mul_(8.0)
    path = str(tmp_path_factory.mktemp("mixtral_q"))
    model.save_pretrained(path)
    return path


def _reference(path: str, scheme: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy tokens, prompt logits) of the model fully in memory, with every expert layer a
    QuantizedExperts (scheme None: the float model)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    patch(model)
    layers = [m for m in model.modules() if isinstance(m, moe.MoE)]
    assert len(layers) == LAYERS
    for layer in layers:
        if scheme is not None:
            layer.experts = QuantizedExperts.from_experts(layer.experts, scheme, G)
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), model(PROMPT).logits


def _reference_tokens(path: str, scheme: str) -> torch.Tensor:
    return _reference(path, scheme)[0]


def _config(budget_experts: int, scheme: str | None, **kw: object) -> mo.OffloadConfig:
    per = _qbytes(scheme) if scheme else (3 * D * I_MOE) * 4
    return mo.OffloadConfig(
        expert_cache_bytes=budget_experts * per * LAYERS,
        expert_quant=scheme,  # type: ignore[arg-type]
        expert_quant_group_size=G,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("path", ["auto", "dequantize-then-matmul"])
def test_tokens_match_in_memory_quantized_model_and_only_quantized_bytes_move(
    model_dir: str, scheme: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, logits = _reference(model_dir, scheme)
    _, float_logits = _reference(model_dir, None)
    if path != "auto":  # as on a device without a fused path: it must say so
        monkeypatch.setattr("moe.quant.matmul_path", lambda device: path)
    want_path = path if path != "auto" else matmul_path("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        om = mo.load(model_dir, "cpu", config=_config(1, scheme, miss="copy", ram_cache_bytes=0))
        try:
            got = om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            with torch.no_grad():
                got_logits = om.model(PROMPT).logits
            rt = om.runtime
            assert rt.quant_paths == {"cpu": want_path}
            per_expert = _qbytes(scheme)
            assert rt.store.expert_bytes(0) == per_expert  # budgets and copies count these bytes
            assert rt.residency.pool_budget == per_expert  # one quantized expert per layer
            st = rt.stats
            assert st.copies > 0 and st.bytes_moved == (st.copies + st.prefetches) * per_expert
            entries = rt.store.device_entries.values()
            assert all(e.flat.dtype == torch.uint8 and e.flat.numel() == per_expert for e in entries)
        finally:
            om.close()
    fallback_warned = [w for w in caught if "dequantized whole" in str(w.message)]
    assert len(fallback_warned) == (1 if want_path == "dequantize-then-matmul" else 0)
    assert torch.equal(got, expected)
    # the quantized model's numbers, not the float model's
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert (got_logits - float_logits).abs().max() > 1e-4


def test_budget_counts_quantized_bytes(model_dir: str) -> None:
    """A budget of 3 int4 experts per layer holds 3 int4 experts (it would hold < 1 fp32 expert)."""
    per = _qbytes("int4")
    assert 3 * per < 3 * D * I_MOE * 4  # 3 int4 experts fit where one fp32 expert does not
    cfg = mo.OffloadConfig(expert_cache_bytes=3 * per * LAYERS, expert_quant="int4", expert_quant_group_size=G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        om = mo.load(model_dir, "cpu", config=cfg)
        try:
            om.model.generate(PROMPT, max_new_tokens=4, do_sample=False)
            assert om.runtime.residency.pool_budget == 3 * per
            resident = [k for k in om.runtime.store.device_entries if k[0] == 0]
            assert len(resident) == 3
        finally:
            om.close()
    with pytest.raises(mo.BudgetError):  # the same bytes cannot hold one fp32 expert
        mo.load(model_dir, "cpu", config=mo.OffloadConfig(expert_cache_bytes=per * LAYERS))


def test_disk_cache_written_once_then_read_and_checked(model_dir: str, tmp_path) -> None:
    cache = str(tmp_path / "qcache")
    expected = _reference_tokens(model_dir, "int4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(2):  # first load writes the cache, second reads it
            om = mo.load(model_dir, "cpu", config=_config(2, "int4", expert_quant_dir=cache))
            try:
                assert torch.equal(om.model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
            finally:
                om.close()
    assert sorted(os.listdir(cache)) == [f"experts-layer{i}.safetensors" for i in range(LAYERS)]
    with pytest.raises(ValueError, match="other settings"):  # a cache of int4 read as int8
        mo.load(model_dir, "cpu", config=_config(2, "int8", expert_quant_dir=cache))
    # scales of another group size written under this cache's metadata
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(cache, "experts-layer0.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["e1.scale_in"] = tensors["e1.scale_in"][:, :1]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="e1.scale_in"):
        mo.load(model_dir, "cpu", config=_config(2, "int4", expert_quant_dir=cache))


def test_load_keyword_sets_the_config(model_dir: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        om = mo.load(model_dir, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20), expert_quant="int8")
    try:
        assert om.runtime.config.expert_quant == "int8"
        assert om.runtime.store.expert_bytes(0) == _qbytes("int8")
    finally:
        om.close()


def test_bad_input(model_dir: str) -> None:
    with pytest.raises(ValueError, match="unknown expert_quant 'int3'"):
        mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant="int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be one of"):
        mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant="int4", expert_quant_group_size=48)
    with pytest.raises(ValueError, match="set expert_quant too"):
        mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant_dir="/tmp/x")
    with pytest.raises(ValueError, match="does not divide the model dim D = 64"):  # 128 does not divide D = 64
        mo.load(model_dir, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant="int4",
                                                          expert_quant_group_size=128))  # fmt: skip
    with pytest.raises(TypeError, match="contradicts"):
        mo.load(model_dir, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant="int4"),
                expert_quant="int8")  # fmt: skip
    with pytest.raises(ValueError, match="does not divide the expert hidden size H = 32"):
        QuantizedExpertShape(64, 32, 64, scheme="int4", group_size=64)


def test_layout_round_trips_quantize() -> None:
    """The uint8 buffer's views are exactly moe.quant.quantize's tensors, for both schemes."""
    torch.manual_seed(1)
    w_in, w_out = torch.randn(D, 2 * I_MOE), torch.randn(I_MOE, D)
    for scheme in ("int8", "int4"):
        shape = QuantizedExpertShape(D, I_MOE, 2 * I_MOE, scheme=scheme, group_size=G)
        flat = torch.empty(shape.numel, dtype=torch.uint8)
        shape.pack(w_in, w_out, flat)
        q_in, q_out = shape.views(flat)
        for q, w in ((q_in, w_in), (q_out, w_out)):
            ref = quantize(w.unsqueeze(0), scheme, G)
            assert torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
            assert (q.zero is None) == (ref.zero is None)
            assert q.zero is None or ref.zero is None or torch.equal(q.zero, ref.zero)
            assert torch.equal(q.dequantize(), ref.dequantize())
        assert shape.numel == _qbytes(scheme)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_tokens_match_in_memory_quantized_model(model_dir: str, scheme: str) -> None:
    """On CUDA the uint8 buffers are copied from pinned RAM and dequantized on the device (no fused
    path there: it says so)."""
    expected = _reference_tokens(model_dir, scheme)
    with pytest.warns(UserWarning, match="dequantized whole"):
        om = mo.load(model_dir, "cuda", config=_config(1, scheme, miss="copy"))
        try:
            got = om.model.generate(PROMPT.cuda(), max_new_tokens=NEW_TOKENS, do_sample=False)
            assert om.runtime.quant_paths == {"cuda": "dequantize-then-matmul"}
            st = om.runtime.stats
            assert st.bytes_moved == (st.copies + st.prefetches) * _qbytes(scheme)
        finally:
            om.close()
    assert torch.equal(got.cpu(), expected)


def test_mixed_precision_miss_runs_low_precision_copy_then_full_copy(model_dir: str) -> None:
    """miss_quant="int4" with room for every expert: the first forward misses everything and so
    equals the int4 model; the full copies are fetched meanwhile, so the second equals the float model."""
    _, int4_logits = _reference(model_dir, "int4")
    _, float_logits = _reference(model_dir, None)
    cfg = _config(E, None, miss_quant="int4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        om = mo.load(model_dir, "cpu", config=cfg)
    try:
        with torch.no_grad():
            first = om.model(PROMPT).logits
            st = om.runtime.stats
            assert st.cpu_misses == st.requests > 0 and st.prefetches == st.cpu_misses and st.copies == 0
            assert om.runtime.low_copy_bytes == len(om.runtime.low_copies) * _qbytes("int4")
            second = om.model(PROMPT).logits
    finally:
        om.close()
    torch.testing.assert_close(first, int4_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, float_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs expert_quant=None"):
        mo.OffloadConfig(expert_cache_bytes=1 << 20, expert_quant="int8", miss_quant="int4")
    with pytest.raises(ValueError, match="does not divide the model dim"):
        mo.load(model_dir, "cpu", config=mo.OffloadConfig(expert_cache_bytes=1 << 20, miss_quant="int4",
                                                          expert_quant_group_size=128))  # fmt: skip
