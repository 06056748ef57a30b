"""A tiny decoder-only MoE transformer LM on byte-level text from the Python standard library.

Shared by examples/quickstart.py and benchmarks/balance.py. Every MLP is a `moe.MoE` layer, so
any causal router can be plugged in ("topk", "aux_free", "recurrent"). Expert choice is not
offered: it picks tokens across the whole batch, so a token's routing would see later tokens.

Shape legend: B batch, S sequence length, D model dim, V vocabulary (256 bytes), T = B * S.
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import moe

VOCAB_SIZE = 256
CAUSAL_ROUTERS = ("topk", "aux_free", "recurrent")


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    """Shape of the tiny LM and its MoE layers.

    Attributes:
        dim: D, model width.
        num_layers: transformer blocks (each has one attention and one MoE layer).
        num_heads: attention heads; must divide dim.
        num_experts: E, routed experts per MoE layer: one int for every layer, or one per layer
            (a pyramid, e.g. (8, 8, 16, 16): DeepSpeed-MoE's PR-MoE puts more experts in later layers).
        top_k: K, experts per token: one int, or one per layer.
        expert_hidden_dim: hidden width of each expert.
        residual: Residual MoE layers (moe.MoE(residual=True): a dense MLP branch mixed with the
            experts by a learned coefficient, DeepSpeed-MoE's use_residual). PR-MoE = pyramid + residual.
        router: "topk" | "aux_free" | "recurrent".
        router_options: keyword options of the router's config, e.g. {"aux_loss_coef": 1e-3}.
        max_seq_len: longest sequence the position embedding covers.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int | tuple[int, ...] = 16
    top_k: int | tuple[int, ...] = 2
    expert_hidden_dim: int = 64
    residual: bool = False
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    max_seq_len: int = 128

    def __post_init__(self) -> None:
        if self.router not in CAUSAL_ROUTERS:
            raise ValueError(
                f"router must be one of {CAUSAL_ROUTERS} for a causal LM, got {self.router!r} "
                "(expert choice sees later tokens of the batch, so it leaks the future)"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide dim ({self.dim})")
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, list):  # a list reads naturally; keep the config hashable
                object.__setattr__(self, name, value := tuple(value))
            if isinstance(value, tuple) and len(value) != self.num_layers:
                raise ValueError(
                    f"{name} has {len(value)} per-layer values but num_layers is {self.num_layers}; give one "
                    "int for every layer or exactly one value per layer"
                )
        for i in range(self.num_layers):
            if self.layer_top_k(i) > self.layer_experts(i):
                raise ValueError(
                    f"layer {i}: top_k ({self.layer_top_k(i)}) exceeds its num_experts ({self.layer_experts(i)})"
                )

    def layer_experts(self, i: int) -> int:
        """E of MoE layer i."""
        return self.num_experts[i] if isinstance(self.num_experts, tuple) else self.num_experts

    def layer_top_k(self, i: int) -> int:
        """K of MoE layer i."""
        return self.top_k[i] if isinstance(self.top_k, tuple) else self.top_k


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y_BHSd.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, cfg: TinyLMConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.num_heads)
        self.mlp_norm = nn.RMSNorm(cfg.dim)
        self.mlp = moe.MoE(
            cfg.dim,
            cfg.expert_hidden_dim,
            cfg.layer_experts(index),
            cfg.layer_top_k(index),
            router=cfg.router,
            residual=cfg.residual,
            **cfg.router_options,
        )

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.mlp(self.mlp_norm(x_BSD))


class TinyLM(nn.Module):
    """Byte-level decoder-only transformer with MoE MLPs and a tied output head."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.dim)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        if cfg.router == "recurrent":
            moe.tie_recurrent_routers(self)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] for int64 byte tokens [B, S]."""
        s = tokens_BS.shape[1]
        if s > self.config.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len ({self.config.max_seq_len})")
        x_BSD = self.embed(tokens_BS) + self.pos(torch.arange(s, device=tokens_BS.device))
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.norm(x_BSD) @ self.embed.weight.t()

    def moe_layers(self) -> list[moe.MoE]:
        return [m for m in self.modules() if isinstance(m, moe.MoE)]

    def param_counts(self) -> tuple[int, int]:
        """(all parameters, parameters active per token): a token uses top_k of each layer's
        num_experts experts (router, shared and dense branches always)."""
        total = sum(p.numel() for p in self.parameters())
        active = total
        for layer in self.moe_layers():
            c = layer.config
            per_expert = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) // layer.experts.w_in.shape[0]
            active -= (c.num_experts - c.top_k) * per_expert
        return total, active

    def max_violation(self) -> float:
        """MaxVio of the latest forward, averaged over the MoE layers."""
        layers = self.moe_layers()
        return sum(layer.stats.max_violation for layer in layers) / len(layers)


# ---------------------------------------------------------------------------------------------
# Data: bytes of the standard library's .py files, split into train / held-out by file.


@dataclass(frozen=True)
class ByteData:
    """Train and held-out byte streams (uint8 tensors) and the files they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    num_train_files: int
    num_heldout_files: int


def stdlib_files() -> list[Path]:
    """The standard library's .py files in sorted order (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .py files under the stdlib path {root}; is this a full Python install?")
    return files


def load_stdlib_bytes(max_train_bytes: int = 4_000_000, heldout_every: int = 10) -> ByteData:
    """Reads stdlib sources deterministically; every `heldout_every`-th file is held out.

    Files are read in sorted order until the train stream has `max_train_bytes`; the
    held-out stream gets about a tenth of that (files never straddle the split).
    """
    if max_train_bytes < 1 or heldout_every < 2:
        raise ValueError(f"need max_train_bytes >= 1 and heldout_every >= 2, got {max_train_bytes}, {heldout_every}")
    train: list[bytes] = []
    heldout: list[bytes] = []
    n_train = n_heldout = 0
    for i, path in enumerate(stdlib_files()):
        if n_train >= max_train_bytes and n_heldout >= max_train_bytes // heldout_every:
            break
        data = path.read_bytes()
        if i % heldout_every == heldout_every - 1:
            if n_heldout < max_train_bytes // heldout_every:
                heldout.append(data)
                n_heldout += len(data)
        elif n_train < max_train_bytes:
            train.append(data)
            n_train += len(data)
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return ByteData(as_tensor(train)[:max_train_bytes], as_tensor(heldout), len(train), len(heldout))


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows [B, S + 1] (int64) of the byte stream: inputs are [:, :-1], targets [:, 1:]."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"byte stream of {stream.numel()} bytes is too short for seq_len {seq_len}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
    return stream[starts.unsqueeze(1) + torch.arange(seq_len + 1)].long()


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimizer steps.
        batch_size, seq_len: B and S of each training batch.
        lr, weight_decay, warmup: AdamW with linear warm-up then cosine decay to lr / 10.
        eval_batches: held-out batches (fixed seed) for the held-out loss.
        maxvio_window: MaxVio is averaged over the last this-many steps.
        seed: model init and batch sampling.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20
    eval_batches: int = 32
    maxvio_window: int = 50
    seed: int = 0


@dataclass
class TrainResult:
    """Per-step history and final metrics of one run."""

    losses: list[float]
    max_vios: list[float]
    train_loss: float
    heldout_loss: float
    heldout_max_vio: float
    max_vio: float
    seconds: float


def lm_loss(model: TinyLM, batch_BS1: torch.Tensor) -> torch.Tensor:
    logits_BSV = model(batch_BS1[:, :-1])
    return F.cross_entropy(logits_BSV.reshape(-1, VOCAB_SIZE), batch_BS1[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: TinyLM, stream: torch.Tensor, cfg: TrainConfig) -> tuple[float, float]:
    """(mean held-out CE loss, mean MaxVio) over cfg.eval_batches fixed batches."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    losses, vios = [], []
    for _ in range(cfg.eval_batches):
        losses.append(float(lm_loss(model, sample_batch(stream, cfg.batch_size, cfg.seq_len, gen))))
        vios.append(model.max_violation())
    model.train(was_training)
    return sum(losses) / len(losses), sum(vios) / len(vios)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    model: TinyLM,
    data: ByteData,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, float, float], None] | None = None,
    distiller: Any = None,
) -> TrainResult:
    """Trains with AdamW on CE + moe.aux_loss(model), calling moe.update_routers after each step.

    distiller: a moe.distill.Distiller (Mixture-of-Students): its staged KD term against the
    teacher's logits on the same batch is added while distiller.active(step).

    MaxVio per step is the mean over MoE layers of layer.stats.max_violation; the reported
    `max_vio` averages it over the last cfg.maxvio_window steps.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    losses: list[float] = []
    vios: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = sample_batch(data.train, cfg.batch_size, cfg.seq_len, gen)
        logits_BSV = model(batch[:, :-1])
        ce = F.cross_entropy(logits_BSV.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))
        loss = ce + moe.aux_loss(model)
        if distiller is not None:
            loss = loss + distiller.term(step, logits_BSV, batch[:, :-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        moe.update_routers(model)
        losses.append(ce.item())
        vios.append(model.max_violation())
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", maxvio=f"{vios[-1]:.2f}")
        if on_step is not None:
            on_step(step, losses[-1], vios[-1])
    seconds = time.perf_counter() - start
    heldout_loss, heldout_vio = evaluate(model, data.heldout, cfg)
    window = max(1, min(cfg.maxvio_window, len(vios)))
    return TrainResult(
        losses=losses,
        max_vios=vios,
        train_loss=sum(losses[-window:]) / window if losses else float("nan"),
        heldout_loss=heldout_loss,
        heldout_max_vio=heldout_vio,
        max_vio=sum(vios[-window:]) / window if vios else float("nan"),
        seconds=seconds,
    )
