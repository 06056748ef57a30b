"""Move between deepspeed.moe.layer.MoE and moe.MoE with the same weights and outputs.

    n = convert(model)        # every DeepSpeed MoE layer -> DeepSpeedStyleMoE (ours), in place
    n = to_deepspeed(model)   # every plain top-k moe.MoE -> deepspeed.moe.layer.MoE, in place

A converted layer is a moe.MoE (any backend, expert parallelism through
moe.integrations.deepspeed.prepare/initialize) whose forward keeps DeepSpeed's call convention,
(output, l_aux, exp_counts), so the surrounding model code is unchanged.

What maps (DeepSpeed -> ours):
    gate.wg.weight [E, D] (logits in fp32)          -> router.weight (router "topk")
    k = 1: softmax prob of the top expert (no renorm) -> norm_topk_prob=False
    k = 2: the two probs renormalised                 -> norm_topk_prob=True
    drop_tokens=False (no capacity)                   -> dropless (capacity_factor=None)
    drop_tokens=True, capacity_factor cf              -> capacity_factor=cf (see below)
    noisy_gate_policy "Jitter"                         -> jitter=1e-2 (the same U(1-eps, 1+eps) input noise)
    l_aux (Switch/GShard balance loss, unweighted)     -> aux_loss_coef=1.0, returned as l_aux
    experts: nn.Sequential(Linear(D, H, bias=False), GELU(), Linear(H, D, bias=False))
             or moe.experts.MLP (SwiGLU or GELU)      -> Experts w_in [E, D, F], w_out [E, H, D]
    use_residual=True (Residual MoE): mlp          -> residual=True, residual_mlp (same activation
                                                     as the experts; width may differ from theirs)
                                      coefficient  -> residual_coef (Linear(D, 2) with bias)
Outputs are identical (up to fp32 summation order) when no token is dropped. Differences that
remain: with capacity, DeepSpeed picks the dropped tokens at random (use_rts) and keeps
min_capacity slots; ours drops later tokens first and has no minimum. DeepSpeed's default k = 2
draws the 2nd expert with Gumbel noise (top2_2nd_expert_sampling=True), even in eval; ours takes
the deterministic 2nd choice. l_aux for k = 2: DeepSpeed counts first choices only.
Not converted (ValueError): experts (or a residual mlp) with biases or other structures,
noisy_gate_policy "RSample", k > 2, layers built with ep_size > 1 (they hold only their
rank's experts: build with ep_size=1 and pass ep_size to prepare/initialize instead).
To DeepSpeed: a residual moe.MoE becomes use_residual=True when its dense branch has the experts'
width (DeepSpeed's dense branch is the expert module itself); otherwise ValueError, as for shared
experts, which DeepSpeed's layer lacks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe.experts import MLP
from moe.layer import MoE
from moe.routing.topk import TopKRouter

try:
    from deepspeed.moe.layer import MoE as DeepSpeedNativeMoE
except ImportError as err:  # pragma: no cover - exercised only without deepspeed
    raise ImportError("moe.integrations.deepspeed_convert needs DeepSpeed: `pip install deepspeed`") from err

JITTER = 1e-2  # DeepSpeed's multiplicative_jitter epsilon


class DeepSpeedStyleMoE(MoE):
    """moe.MoE with DeepSpeed's forward signature: (output, l_aux, exp_counts [E] int64)."""

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [..., D] (used_token [...] marks real tokens) -> (output, l_aux, exp_counts [E])."""
        mask = None if used_token is None else used_token.reshape(hidden_states.shape[:-1]).bool()
        y = MoE.forward(self, hidden_states, mask)
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        l_aux = sum(self.aux_losses.values(), torch.zeros((), device=y.device))
        assert self._load is not None
        return y, l_aux, self._load.detach()


def _expert_weights(expert: nn.Module, dim: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(activation, w_in [D, F], w_out [H, D]) of one DeepSpeed expert module."""
    if isinstance(expert, MLP):
        linears = [expert.up_proj, expert.down_proj] + ([expert.gate_proj] if expert.activation == "swiglu" else [])
        if any(lin.bias is not None for lin in linears):
            raise ValueError("expert MLP has biases; moe.MoE experts have none")
        up = expert.up_proj.weight.t()
        w_in = torch.cat([expert.gate_proj.weight.t(), up], dim=1) if expert.activation == "swiglu" else up
        return expert.activation, w_in, expert.down_proj.weight.t()
    mods = list(expert.children()) if isinstance(expert, nn.Sequential) else []
    if (
        len(mods) == 3
        and isinstance(mods[0], nn.Linear)
        and isinstance(mods[1], nn.GELU)
        and mods[1].approximate == "none"
        and isinstance(mods[2], nn.Linear)
        and mods[0].bias is None
        and mods[2].bias is None
        and mods[0].in_features == dim
    ):
        return "gelu", mods[0].weight.t(), mods[2].weight.t()
    raise ValueError(
        f"cannot convert expert module {type(expert).__name__}: convert() understands "
        "nn.Sequential(nn.Linear(D, H, bias=False), nn.GELU(), nn.Linear(H, D, bias=False)) and "
        "moe.experts.MLP; rewrite the expert as one of those"
    )


@torch.no_grad()
def from_deepspeed_layer(layer: Any, backend: str = "auto") -> DeepSpeedStyleMoE:
    """A DeepSpeedStyleMoE with the weights and routing of one deepspeed.moe.layer.MoE."""
    if not isinstance(layer, DeepSpeedNativeMoE):
        raise TypeError(f"expected deepspeed.moe.layer.MoE, got {type(layer).__name__}")
    if isinstance(layer, MoE):
        raise TypeError("this layer is already a moe.MoE (prepared for DeepSpeed)")
    if layer.ep_size != 1:
        raise ValueError(
            f"layer was built with ep_size={layer.ep_size} and holds only its rank's experts; build it with "
            "ep_size=1 and pass ep_size to moe.integrations.deepspeed.prepare/initialize instead"
        )
    gate = layer.deepspeed_moe.gate
    if gate.k not in (1, 2):
        raise ValueError(f"k={gate.k}: only top-1 and top-2 DeepSpeed gates are converted")
    if gate.noisy_gate_policy not in (None, "None", "Jitter"):
        raise ValueError(f"noisy_gate_policy={gate.noisy_gate_policy!r} is not converted; use None or 'Jitter'")
    if gate.drop_tokens and float(gate.eval_capacity_factor) != float(gate.capacity_factor):
        # moe.MoE has one capacity factor for training and eval; DeepSpeed switches in eval().
        raise ValueError(
            f"eval_capacity_factor ({gate.eval_capacity_factor}) != capacity_factor ({gate.capacity_factor}): "
            "the converted layer has one capacity factor; build the DeepSpeed layer with equal factors "
            "(or set the converted layer's config.capacity_factor for evaluation yourself)"
        )
    experts = list(layer.deepspeed_moe.experts.deepspeed_experts)
    dim = gate.wg.in_features
    parts = [_expert_weights(e, dim) for e in experts]
    activations = {a for a, _, _ in parts}
    if len(activations) != 1:
        raise ValueError(f"experts mix activations {sorted(activations)}")
    activation = parts[0][0]
    w_in = torch.stack([p[1] for p in parts])
    w_out = torch.stack([p[2] for p in parts])
    hidden = w_out.shape[1]
    residual = None
    if layer.use_residual:
        residual = _expert_weights(layer.mlp, dim)
        if residual[0] != activation:
            raise ValueError(
                f"the residual mlp uses {residual[0]} but the experts {activation}: moe.MoE's dense branch "
                "has the experts' activation"
            )
    ours = DeepSpeedStyleMoE(
        dim,
        hidden,
        len(experts),
        gate.k,
        capacity_factor=float(gate.capacity_factor) if gate.drop_tokens else None,
        activation=activation,
        backend=backend,
        norm_topk_prob=gate.k == 2,
        aux_loss_coef=1.0,
        jitter=JITTER if gate.noisy_gate_policy == "Jitter" else 0.0,
        residual=residual is not None,
        residual_hidden_dim=None if residual is None else residual[2].shape[0],
    )
    ref = gate.wg.weight
    ours.to(device=ref.device, dtype=w_in.dtype)
    router: Any = ours.router
    router.weight.copy_(ref)
    ours.experts.w_in.copy_(w_in)
    ours.experts.w_out.copy_(w_out)
    if residual is not None:
        assert ours.residual_mlp is not None and ours.residual_coef is not None
        _load_mlp(ours.residual_mlp, residual[1], residual[2])
        ours.residual_coef.weight.copy_(layer.coefficient.weight)
        ours.residual_coef.bias.copy_(layer.coefficient.bias)
    ours.train(layer.training)
    return ours


def _load_mlp(mlp: MLP, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
    """Writes w_in [D, F] (gate | up for SwiGLU) and w_out [H, D] into an MLP's Linear layers."""
    h = w_out.shape[0]
    if mlp.activation == "swiglu":
        mlp.gate_proj.weight.copy_(w_in[:, :h].t())
        mlp.up_proj.weight.copy_(w_in[:, h:].t())
    else:
        mlp.up_proj.weight.copy_(w_in.t())
    mlp.down_proj.weight.copy_(w_out.t())


def convert(model: nn.Module, backend: str = "auto") -> int:
    """Replaces every deepspeed.moe.layer.MoE in model (or model itself: use from_deepspeed_layer) in place.

    Returns:
        the number of layers replaced.
    """
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, DeepSpeedNativeMoE) and not isinstance(child, MoE):
                setattr(module, child_name, from_deepspeed_layer(child, backend))
                replaced += 1
    return replaced


@torch.no_grad()
def to_deepspeed_layer(layer: MoE) -> Any:
    """A deepspeed.moe.layer.MoE (ep_size=1) with the weights and routing of a plain top-k moe.MoE."""
    c = layer.config
    router = layer.router
    if type(router) is not TopKRouter:
        raise ValueError(f"only the 'topk' router maps to DeepSpeed's gate, got {type(router).__name__}")
    rc = router.config
    if (c.top_k, rc.norm_topk_prob) not in ((1, False), (2, True)):
        raise ValueError(
            f"DeepSpeed's gate is top-1 unnormalised or top-2 renormalised; got top_k={c.top_k}, "
            f"norm_topk_prob={rc.norm_topk_prob}"
        )
    if rc.jitter not in (0.0, JITTER) or rc.z_loss_coef:
        raise ValueError(f"jitter must be 0 or {JITTER} and z_loss_coef 0 to map to DeepSpeed's gate")
    if c.num_shared_experts or layer.parallel is not None:
        raise ValueError("shared experts and expert-parallel layers have no deepspeed.moe.layer.MoE equivalent")
    if c.residual and c.residual_dim != c.hidden_dim:
        raise ValueError(
            f"the residual dense branch is {c.residual_dim} wide but the experts {c.hidden_dim}: DeepSpeed's "
            "use_residual dense branch is the expert module itself, so it must have the experts' width"
        )
    h = c.hidden_dim
    ds = DeepSpeedNativeMoE(
        c.dim,
        MLP(c.dim, h, c.activation),
        num_experts=c.num_experts,
        ep_size=1,
        k=c.top_k,
        capacity_factor=c.capacity_factor or 1.0,
        eval_capacity_factor=c.capacity_factor or 1.0,
        min_capacity=0,
        noisy_gate_policy="Jitter" if rc.jitter else None,
        drop_tokens=not c.dropless,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        use_residual=c.residual,
    )
    w = layer.experts.w_in
    ds.to(device=w.device, dtype=w.dtype)
    ds.deepspeed_moe.gate.wg.float().weight.copy_(router.weight)
    for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        _load_mlp(expert, layer.experts.w_in[e], layer.experts.w_out[e])
    if c.residual:
        assert layer.residual_mlp is not None and layer.residual_coef is not None
        ds.mlp.load_state_dict(layer.residual_mlp.state_dict())
        ds.coefficient.weight.copy_(layer.residual_coef.weight)
        ds.coefficient.bias.copy_(layer.residual_coef.bias)
    ds.train(layer.training)
    return ds


def to_deepspeed(model: nn.Module) -> int:
    """Replaces every convertible moe.MoE child in model with a deepspeed.moe.layer.MoE, in place.

    The replaced layers return DeepSpeed's (output, l_aux, exp_counts) tuple. Returns the count.
    """
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoE) and not isinstance(child, DeepSpeedNativeMoE):
                setattr(module, child_name, to_deepspeed_layer(child))
                replaced += 1
    return replaced


__all__ = ["DeepSpeedStyleMoE", "from_deepspeed_layer", "convert", "to_deepspeed_layer", "to_deepspeed"]
