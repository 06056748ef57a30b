"""moe.integrations.transformers.from_hf against the Hugging Face blocks themselves (fp32, CPU).

Routing is compared exactly (expert ids; DeepSeek's unsorted top-k as sets per token), outputs
and every gradient (input, experts, router, shared experts) with the fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from hf_tiny import DIM, FAMILIES, block_class, block_output, expert_tensors, hf_routing, tiny_config
from torch import nn

from moe.integrations.hf_families import spec_for
from moe.integrations.transformers import HFMoEBlock, from_hf, patch
from moe.routing.sparsemixer import sparsemixer_eval

# (batch, seq): 21 tokens (not a power of two) and a single token.
SHAPES = [(3, 7), (1, 1)]

ROUTER_STD = {"deepseek_v3": 0.15, "glm4_moe": 0.15, "dots1": 0.15}
UNSORTED_TOPK = (
    "deepseek",
    "glm4_moe",
    "dots1",
    "exaone_moe",
    "minicpm5_moe",
    "solar_open",
    "minimax_m2",
)  # HF's top-k is unsorted: compare as sets


def hf_router(block: nn.Module) -> nn.Module:
    router: nn.Module = getattr(block, spec_for(block).router_attr)
    return router  # sigmoid scores stay clear of fp32 ties at 1.0


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_block(family: str) -> nn.Module:
    """The family's HF block with random weights (HF leaves them uninitialised outside a model)."""
    torch.manual_seed(0)
    block = block_class(family)(tiny_config(family))
    with torch.no_grad():
        for name, param in block.named_parameters():
            std = ROUTER_STD.get(family, 0.5) if name in ("gate.weight", "router.weight") else 0.2
            param.copy_(torch.randn_like(param) * std)
        bias = getattr(hf_router(block), "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn_like(bias) * 0.1)
    return block.eval()  # PhiMoE's sparsemixer samples in training mode


def sorted_routing(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ordered by expert id, so unsorted top-k results compare as sets."""
    ids, order = ids_TK.sort(dim=1)
    return ids, weights_TK.gather(1, order)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])  # GPT-OSS: test_experts_bias_swiglu_oai
@pytest.mark.parametrize("shape", SHAPES)
def test_routing_matches_hf_router(family: str, shape: tuple[int, int]) -> None:
    block = make_block(family)
    layer = from_hf(block)
    x_TD = torch.randn(shape[0] * shape[1], DIM)
    hf = hf_routing(block, x_TD)
    if hf is None:
        pytest.skip(f"this transformers' {family} gate is a plain Linear: routing is checked through the block outputs")
    hf_weights, hf_ids = hf
    routing = layer.router(x_TD)
    ours_ids, ours_w = routing.expert_ids, routing.weights
    if family.startswith(UNSORTED_TOPK):
        hf_ids, hf_weights = sorted_routing(hf_ids, hf_weights)
        ours_ids, ours_w = sorted_routing(ours_ids, ours_w)
    assert torch.equal(ours_ids, hf_ids)
    assert_close(ours_w, hf_weights.float())
    if x_TD.shape[0] > 1:  # routing is not degenerate: several experts and several distinct routes
        assert hf_ids.unique().numel() >= 4
        assert hf_ids.unique(dim=0).shape[0] > 1


def test_deepseek_v3_group_limit_and_bias_matter() -> None:
    """The oracle case exercises the group limit and e_score_correction_bias, not plain top-k."""
    block = make_block("deepseek_v3")
    layer = from_hf(block)
    x_TD = torch.randn(64, DIM)
    scores = torch.sigmoid(x_TD @ block.gate.weight.t())
    plain = (scores + block.gate.e_score_correction_bias).topk(3, dim=-1).indices.sort(1).values
    unbiased = scores.topk(3, dim=-1).indices.sort(1).values
    ours = layer.router(x_TD).expert_ids.sort(1).values
    assert not torch.equal(ours, plain)  # some tokens lose an expert to the group limit
    assert not torch.equal(plain, unbiased)  # the bias changes some choices
    assert torch.equal(ours, hf_routing(block, x_TD)[1].sort(1).values)  # type: ignore[index]
    assert torch.equal(layer.router.e_score_correction_bias, block.gate.e_score_correction_bias)
    cfg = layer.router.config
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (4, 2, 2.5, True)


def _grads(block: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y_hf, y_ours, dx_hf, dx_ours) for the same upstream gradient."""
    g = torch.randn_like(x)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y_ours = block_output(block(x_hf)), layer(x_ours)
    (y_hf * g).sum().backward()
    (y_ours * g).sum().backward()
    return y_hf, y_ours, x_hf.grad, x_ours.grad


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])  # GPT-OSS: test_experts_bias_swiglu_oai
@pytest.mark.parametrize("shape", SHAPES)
def test_block_forward_and_gradients_match_hf(family: str, shape: tuple[int, int]) -> None:
    block = make_block(family)
    layer = from_hf(block)
    x = torch.randn(*shape, DIM)
    y_hf, y_ours, dx_hf, dx_ours = _grads(block, layer, x)
    assert y_ours.shape == y_hf.shape
    assert_close(y_ours, y_hf)
    assert_close(dx_ours, dx_hf)
    # Parameter gradients, mapped to our layout.
    gate_up_grad, down_grad = expert_tensors(block, grad=True)
    assert_close(layer.experts.w_in.grad, gate_up_grad.transpose(1, 2))
    assert_close(layer.experts.w_out.grad, down_grad.transpose(1, 2))
    assert_close(layer.router.weight.grad, hf_router(block).weight.grad)
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert_close(getattr(layer.shared_experts, name).weight.grad, getattr(shared, name).weight.grad)
    if hasattr(block, "shared_expert_gate"):
        assert_close(layer.shared_expert_gate.weight.grad, block.shared_expert_gate.weight.grad)


def test_weights_are_copied_not_shared() -> None:
    block = make_block("qwen2_moe")
    layer = from_hf(block)
    assert layer.shared_expert_gate is not None and layer.config.shared_expert_hidden_dim == 40
    assert_close(layer.experts.w_in, expert_tensors(block)[0].transpose(1, 2))
    with torch.no_grad():
        for param in [*block.experts.parameters(), block.gate.weight]:
            param.zero_()
    assert layer.experts.w_in.abs().sum() > 0 and layer.router.weight.abs().sum() > 0


def test_norm_topk_prob_flag_is_carried() -> None:
    off, on = from_hf(make_block("olmoe")), from_hf(make_block("olmoe_norm"))
    assert off.router.config.norm_topk_prob is False and on.router.config.norm_topk_prob is True
    x_TD = torch.randn(5, DIM)
    assert not torch.allclose(off.router(x_TD).weights.sum(-1), torch.ones(5))
    assert_close(on.router(x_TD).weights.sum(-1), torch.ones(5))


def test_bf16_block_keeps_dtype_and_fp32_bias() -> None:
    block = make_block("deepseek_v3").to(torch.bfloat16)
    block.gate.e_score_correction_bias.data = block.gate.e_score_correction_bias.float()  # as HF keeps it
    layer = from_hf(block)
    assert layer.experts.w_in.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.bfloat16
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(2, 5, DIM, dtype=torch.bfloat16)
    assert_close(layer(x), block(x))


def test_router_overrides() -> None:
    layer = from_hf(make_block("mixtral"), aux_loss_coef=1e-2)
    layer(torch.randn(2, 3, DIM))
    assert set(layer.aux_losses) == {"balance"} and layer.aux_losses["balance"] > 0
    assert from_hf(make_block("mixtral")).router.config.aux_loss_coef == 0.0  # HF blocks add no loss
    with pytest.raises(TypeError, match=r"unknown router override\(s\) \['bogus'\] for Mixtral"):
        from_hf(make_block("mixtral"), bogus=1)


# --- 4.57-style blocks: per-expert nn.Linear modules, (hidden, router_logits) returned ---------------


class _LegacyMLP(nn.Module):
    def __init__(self, names: tuple[str, str, str], dim: int, hidden: int) -> None:
        super().__init__()
        self.names = names
        for name, (i, o) in zip(names, [(dim, hidden), (dim, hidden), (hidden, dim)], strict=True):
            setattr(self, name, nn.Linear(i, o, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class _LegacyBlock(nn.Module):
    """The 4.57 data path, written plainly: softmax top-k, per-token loop over experts."""

    names: tuple[str, str, str] = ("w1", "w3", "w2")

    def __init__(self, num_experts: int = 6, top_k: int = 2, hidden: int = 24, norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(DIM, num_experts, bias=False)
        self.experts = nn.ModuleList(_LegacyMLP(self.names, DIM, hidden) for _ in range(num_experts))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p) * 0.3)

    def shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_TD)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = hidden_states.reshape(-1, DIM)
        logits = self.gate(x_TD)
        weights, ids = F.softmax(logits, dim=1, dtype=torch.float).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        rows = [
            sum(weights[t, k] * self.experts[int(ids[t, k])](x_TD[t]) for k in range(self.top_k))
            for t in range(x_TD.shape[0])
        ]
        y = torch.stack(rows) + self.shared(x_TD)  # type: ignore[arg-type]
        return y.view(hidden_states.shape), logits


class MixtralSparseMoeBlock(_LegacyBlock):  # named as HF 4.57's class: recognised by name
    pass


class Qwen2MoeSparseMoeBlock(_LegacyBlock):
    names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self) -> None:
        super().__init__(top_k=3, norm_topk_prob=False)
        self.shared_expert = _LegacyMLP(self.names, DIM, 40)
        self.shared_expert_gate = nn.Linear(DIM, 1, bias=False)

    def shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)


@pytest.mark.parametrize("legacy_cls", [MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock])
def test_per_expert_blocks_match(legacy_cls: type[_LegacyBlock]) -> None:
    block = legacy_cls()
    layer = from_hf(block)
    x = torch.randn(3, 7, DIM)
    y_hf, logits_hf = block(x)
    y_ours, _, dx_hf, dx_ours = _grads(lambda h: block(h)[0], layer, x)  # type: ignore[arg-type]
    assert_close(y_ours, y_hf)
    assert_close(dx_ours, dx_hf)
    assert torch.equal(layer.router(x.view(-1, DIM)).expert_ids, F.softmax(logits_hf, -1).topk(block.top_k).indices)
    # patch() keeps the 4.57 return convention: (hidden, router_logits).
    holder = nn.Sequential(nn.Identity(), block)
    assert patch(holder) == 1 and isinstance(holder[1], HFMoEBlock)
    out, logits = holder[1](x)
    assert_close(out, y_hf)
    assert_close(logits, logits_hf)


# --- errors ----------------------------------------------------------------------------------------


def test_unsupported_block_names_class_and_supported_list() -> None:
    with pytest.raises(
        TypeError, match=r"Linear is not a supported .*supported: MixtralSparseMoeBlock, .*DeepseekV3MoE"
    ):
        from_hf(nn.Linear(4, 4))


def test_supported_name_with_unknown_layout() -> None:
    class OlmoeSparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(DIM, 4, bias=False)
            self.experts = nn.Linear(DIM, DIM)

    with pytest.raises(TypeError, match=r"OlmoeSparseMoeBlock.experts has an unsupported layout \(Linear\)"):
        from_hf(OlmoeSparseMoeBlock())


def test_non_silu_experts_rejected() -> None:
    config = tiny_config("qwen3_moe")
    config.hidden_act = "gelu"
    block = block_class("qwen3_moe")(config)
    with pytest.raises(
        TypeError, match="Qwen3MoeSparseMoeBlock uses activation GELUActivation; moe.MoE experts are SwiGLU"
    ):
        from_hf(block)


def test_deepseek_v2_unknown_topk_method_rejected() -> None:
    config = tiny_config("deepseek_v2")
    config.topk_method = "noaux_tc"
    with pytest.raises(TypeError, match="topk_method='noaux_tc' is not supported; supported: 'greedy'"):
        from_hf(block_class("deepseek_v2")(config))


def test_deepseek_v2_group_limit_matters() -> None:
    """group_limited_greedy drops some tokens' plain top-k experts (groups scored by their max)."""
    block = make_block("deepseek_v2_group")
    layer = from_hf(block)
    assert (layer.router.config.n_group, layer.router.config.group_score) == (4, "max")
    x_TD = torch.randn(64, DIM)
    plain = torch.softmax(x_TD @ block.gate.weight.t(), -1).topk(3, dim=-1).indices.sort(1).values
    ours = layer.router(x_TD).expert_ids.sort(1).values
    assert not torch.equal(ours, plain)
    assert torch.equal(ours, hf_routing(block, x_TD)[1].sort(1).values)  # type: ignore[index]


def test_phimoe_sparsemixer_matches_hf_and_refuses_training() -> None:
    """The window of the second pick matters: some tokens' weights differ from plain softmax top-2."""
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    scores = torch.randn(256, 6) * 3
    for eps in (0.01, 0.5):
        w_hf, ids_hf = phimoe.sparsemixer(scores, jitter_eps=eps, training=False, top_k=2)
        w, ids = sparsemixer_eval(scores, eps)
        assert torch.equal(ids, ids_hf)
        assert torch.equal(w, w_hf)
    layer = from_hf(make_block("phimoe"))
    layer.train()
    with pytest.raises(NotImplementedError, match="training-mode sparsemixer"):
        layer(torch.randn(2, 3, DIM))
