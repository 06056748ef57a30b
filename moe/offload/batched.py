"""Batched generation over an offloaded model: many prompts, FIFO or regrouped decode steps.

    run = moe.offload.generate_batched(om.model, prompts, max_new_tokens=32,
                                       scheduler=SchedulerConfig(kind="regroup", batch_size=16))
    run.results[i].tokens          # request i's new tokens, in input order; run.tokens_per_s

Prefill: a request is admitted when the scheduler's pool has room (moe.offload.schedule) and its
prompt runs alone (batch 1: no padding reaches the experts), giving its first token. Then every
decode step runs one new token of each request the scheduler picks:
  - models with a KV cache (transformers causal LMs, as moe.offload.load returns them): each
    request keeps its own cache; a step left-pads the batch's caches to a common length, masks
    the padding (attention_mask), gives each token its own position (position_ids), and splits
    the grown cache back. Greedy fp32 tokens equal each prompt's own generate().
  - models without one (forward(tokens [B, S]) -> logits [B, S, V], context config.max_seq_len,
    e.g. examples/tiny_lm.py's TinyLM): the batch's whole sequences, right-padded (a causal model's
    real positions never attend to padding on their right), logits read at each request's last
    token. The padding does pass through the experts (dropless routing: it displaces nothing).

Prediction for the regrouping scheduler (moe.offload.schedule.TokenRoutes): the experts earlier
tokens with the same id chose at every layer (learned during the run from the routers' outputs,
read by forward hooks: no extra forward), or, for an id not seen yet, the experts the request's
previous token chose (every layer's router on its newest hidden state).
Shape legend: B requests in a step, S sequence, V vocabulary, K top-k.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe.offload.policies import Key
from moe.offload.schedule import BatchQueue, SchedulerConfig, TokenRoutes

__all__ = ["BatchedRun", "Request", "RequestResult", "generate_batched"]


@dataclass(frozen=True)
class Request:
    """One prompt with its own stop conditions (None: the generate_batched call's)."""

    prompt: Sequence[int] | torch.Tensor
    max_new_tokens: int | None = None
    stop_token_ids: Collection[int] | None = None


@dataclass
class RequestResult:
    """What one request generated: new tokens (the stop token included), why it stopped
    ("stop": a stop token, "length": max_new_tokens, "context": the model's context is full), and
    its seconds from admission (prefill start) to its last token."""

    tokens: list[int]
    stop_reason: str
    prompt_len: int
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the request's own seconds (prefill included)."""
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class BatchedRun:
    """Results in input order, decode steps, the longest wait (steps left out) and wall seconds."""

    results: list[RequestResult]
    steps: int
    max_wait_steps: int
    seconds: float
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """New tokens of all requests."""
        return sum(len(r.tokens) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        """All new tokens over the whole run's seconds."""
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class _RouterTap:
    """Forward hooks on every moe.MoE router: expert ids [T, K] of each layer's last call."""

    def __init__(self, model: nn.Module) -> None:
        from moe.layer import MoE

        self.routers = [m.router for m in model.modules() if isinstance(m, MoE)]
        self.ids: list[torch.Tensor | None] = [None] * len(self.routers)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):  # noqa: ANN202
        def hook(_router: nn.Module, _args: tuple, routing: Any) -> None:
            self.ids[i] = routing.expert_ids.detach().cpu()

        return hook

    def keys(self, rows: Sequence[int]) -> list[frozenset[Key]]:
        """Per row (token) of the last forward, the (layer, expert) keys it chose at every layer."""
        out: list[set[Key]] = [set() for _ in rows]
        for layer, ids in enumerate(self.ids):
            if ids is None:
                continue
            for j, row in enumerate(rows):
                if row < ids.shape[0]:
                    out[j].update((layer, int(e)) for e in ids[row].tolist() if e >= 0)
        self.ids = [None] * len(self.routers)
        return [frozenset(k) for k in out]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _cache_kwarg(model: nn.Module) -> str | None:
    """The forward's KV-cache keyword ("cache" in transformers >= 5.x, "past_key_values" before),
    or None for a model without a KV cache."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" not in params:
        return None
    return "cache" if "cache" in params else "past_key_values"


def _context(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def _requests(prompts: Sequence[Any], vocab: int | None, context: int | None) -> list[tuple[list[int], Request]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of token-id lists, 1-D tensors or Requests, got {type(prompts).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt (a list of token ids)")
    out = []
    for i, p in enumerate(prompts):
        req = p if isinstance(p, Request) else Request(p)
        ids = req.prompt
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point():
                raise ValueError(
                    f"prompt {i}: a tensor prompt must be 1-D integer token ids, got {tuple(ids.shape)} {ids.dtype}"
                )
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"prompt {i} must be token ids (ints); tokenize text first, got {ids!r:.60}")
        tokens = list(ids)
        if not tokens:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if vocab is not None and not all(0 <= t < vocab for t in tokens):
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {tokens!r:.60}")
        if context is not None and len(tokens) > context:
            raise ValueError(
                f"prompt {i} has {len(tokens)} tokens, longer than the model's context of {context}; shorten it"
            )
        if req.max_new_tokens is not None and req.max_new_tokens < 1:
            raise ValueError(f"prompt {i}: max_new_tokens must be >= 1, got {req.max_new_tokens}")
        out.append((tokens, req))
    return out


def _stops(value: Any, where: str) -> frozenset[int]:
    if isinstance(value, int) or not isinstance(value, Collection) or not all(isinstance(t, int) for t in value):
        raise TypeError(f"{where} must be a collection of token ids (ints), e.g. [2], got {value!r}")
    return frozenset(value)


class _State:
    """One admitted request: its sequence, stop conditions, KV cache (per layer (k, v)) and prediction."""

    def __init__(self, tokens: list[int], max_new: int, stops: frozenset[int], seed: int) -> None:
        self.seq, self.prompt_len, self.max_new, self.stops = list(tokens), len(tokens), max_new, stops
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.predicted: frozenset[Key] = frozenset()
        self.generator = torch.Generator().manual_seed(seed)
        self.start = time.perf_counter()
        self.stop_reason = ""

    @property
    def new(self) -> list[int]:
        return self.seq[self.prompt_len :]


def _pick(logits_V: torch.Tensor, state: _State, do_sample: bool, temperature: float, top_k: int | None) -> int:
    logits_V = logits_V.detach().float().cpu()
    if not do_sample:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.shape[0]:
        cut = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < cut, float("-inf"))
    return int(torch.multinomial(logits_V.softmax(-1), 1, generator=state.generator))


@torch.no_grad()
def generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor | Request],
    *,
    max_new_tokens: int = 32,
    scheduler: SchedulerConfig | None = None,
    stop_token_ids: Collection[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> BatchedRun:
    """Generates for every prompt, `scheduler.batch_size` requests a decode step.

    Args:
        model: a transformers causal LM (moe.offload.load(...).model, or any in memory) or a
            module mapping tokens [B, S] to logits [B, S, V] (see the module docstring).
        prompts: token-id lists, 1-D int tensors, or Request(prompt, max_new_tokens, stop_token_ids).
        max_new_tokens: new tokens per request unless its Request says otherwise.
        scheduler: SchedulerConfig (default FIFO, batch 8).
        stop_token_ids: tokens that end a request (kept in its output); None: the model's
            generation_config.eos_token_id when it has one.
        do_sample: sample (softmax(logits / temperature), top_k) instead of greedy; request i's
            generator is seeded with seed + i, so its tokens do not depend on the batching.

    Returns:
        BatchedRun with one RequestResult per prompt, in input order.

    Raises:
        ValueError / TypeError: empty prompt list or prompt, token ids outside the vocabulary, a
            prompt longer than the model's context, max_new_tokens < 1, temperature <= 0, top_k < 1.
    """
    scheduler = scheduler if scheduler is not None else SchedulerConfig()
    if not isinstance(scheduler, SchedulerConfig):
        raise TypeError(f"scheduler must be a moe.offload.SchedulerConfig, got {type(scheduler).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    context = _context(model)
    reqs = _requests(prompts, _vocab(model), context)
    if stop_token_ids is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    default_stops = _stops(stop_token_ids, "stop_token_ids")
    per_request = [
        default_stops if req.stop_token_ids is None else _stops(req.stop_token_ids, f"prompt {i}'s stop_token_ids")
        for i, (_, req) in enumerate(reqs)
    ]
    cache_kw = _cache_kwarg(model)
    if cache_kw is None and context is None:
        raise ValueError("a model without a KV cache needs config.max_seq_len (its context) for batched generation")
    device = next(model.parameters()).device
    queue = BatchQueue(len(reqs), scheduler)
    states: dict[int, _State] = {}
    results: list[RequestResult | None] = [None] * len(reqs)
    tap = _RouterTap(model)
    routes = TokenRoutes()
    start = time.perf_counter()
    sizes: list[int] = []

    def finish_if_done(r: int) -> None:
        s = states[r]
        if s.seq[-1] in s.stops:
            s.stop_reason = "stop"
        elif len(s.new) >= s.max_new:
            s.stop_reason = "length"
        elif context is not None and len(s.seq) > context:  # its newest token has no position left
            s.stop_reason = "context"
        else:
            return
        results[r] = RequestResult(s.new, s.stop_reason, s.prompt_len, time.perf_counter() - s.start)
        queue.finished(r)
        del states[r]

    try:
        while not queue.done:
            for r in queue.admit():
                tokens, req = reqs[r]
                states[r] = s = _State(tokens, req.max_new_tokens or max_new_tokens, per_request[r], seed + r)
                ids = torch.tensor([s.seq], device=device)
                if cache_kw is None:
                    logits = model(ids)
                else:
                    out = model(ids, use_cache=True)
                    logits = out.logits
                    s.kv = _layers_kv(getattr(out, cache_kw))
                for token, keys in zip(s.seq, tap.keys(range(len(s.seq))), strict=True):
                    routes.observe(token, keys)
                    s.predicted = keys
                s.seq.append(_pick(logits[0, -1], s, do_sample, temperature, top_k))
                finish_if_done(r)
            if queue.done:
                break
            if not queue.active:
                continue
            predicted = {r: routes.predict(states[r].seq[-1], states[r].predicted) for r in queue.active}
            batch = queue.next_batch(predicted)
            sizes.append(len(batch))
            group = [states[r] for r in batch]
            logits_BV, rows = _decode_step(model, group, cache_kw, device)
            for r, s, logits_V, keys in zip(batch, group, logits_BV, tap.keys(rows), strict=True):
                routes.observe(s.seq[-1], keys)
                s.predicted = keys
                s.seq.append(_pick(logits_V, s, do_sample, temperature, top_k))
                finish_if_done(r)
    finally:
        tap.close()
    done = [r for r in results if r is not None]
    assert len(done) == len(reqs)
    return BatchedRun(done, len(sizes), queue.max_wait_seen, time.perf_counter() - start, sizes)


def _layers_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) [1, H, S, d] of a transformers cache (DynamicCache or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise TypeError(
                "batched generation: sliding-window KV caches are not supported (the padded merge assumes full ones)"
            )
        return [(layer.keys, layer.values) for layer in layers]
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    raise TypeError(f"batched generation: unsupported KV cache type {type(cache).__name__} (DynamicCache expected)")


def _decode_step(
    model: nn.Module, group: list[_State], cache_kw: str | None, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """One forward of the group's newest tokens: logits [B, V] and each token's row in the
    routers' input (for the prediction)."""
    lengths = [len(s.seq) for s in group]  # the newest token is not in the cache yet
    b = len(group)
    if cache_kw is None:  # whole sequences, right-padded
        width = max(lengths)
        ids = torch.zeros(b, width, dtype=torch.long, device=device)
        for i, s in enumerate(group):
            ids[i, : len(s.seq)] = torch.tensor(s.seq, device=device)
        logits = model(ids)
        last = torch.tensor([n - 1 for n in lengths], device=device)
        return logits[torch.arange(b, device=device), last], [i * width + n - 1 for i, n in enumerate(lengths)]
    from transformers import DynamicCache

    past = max(n - 1 for n in lengths)
    pad = torch.nn.functional.pad
    merged = []
    for layer in range(len(group[0].kv)):
        ks = [pad(s.kv[layer][0], (0, 0, past - s.kv[layer][0].shape[-2], 0)) for s in group]
        vs = [pad(s.kv[layer][1], (0, 0, past - s.kv[layer][1].shape[-2], 0)) for s in group]
        merged.append((torch.cat(ks), torch.cat(vs)))
    mask = torch.zeros(b, past + 1, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, past + 1 - n :] = 1
    try:
        out = model(
            torch.tensor([[s.seq[-1]] for s in group], device=device),
            attention_mask=mask,
            position_ids=torch.tensor([[n - 1] for n in lengths], device=device),
            use_cache=True,
            **{cache_kw: DynamicCache(ddp_cache_data=merged)},
        )
    except RuntimeError as e:
        if b == 1:
            raise
        # transformers' own padded batched generate() fails the same way for some attention
        # variants (DeepSeek-V3's latent attention in transformers 5.x): name the way out.
        raise RuntimeError(
            f"a batched decode step of {type(model).__name__} ({b} requests, left-padded KV caches) failed inside "
            f"its forward: {e}. Its attention does not take padded batches; use SchedulerConfig(batch_size=1)"
        ) from e
    grown = _layers_kv(getattr(out, cache_kw))
    for i, (s, n) in enumerate(zip(group, lengths, strict=True)):
        s.kv = [(k[i : i + 1, :, -n:].clone(), v[i : i + 1, :, -n:].clone()) for k, v in grown]
    return out.logits[:, -1], list(range(b))
