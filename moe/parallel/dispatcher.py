"""Expert-parallel dispatch and combine over a process group, optionally pipelined in d chunks.

The same seam as moe.dispatch.LocalDispatcher (dispatch -> experts -> combine), built from the
same ops (sort_by_expert, permute, unpermute) plus all_to_all_single with per-rank splits:
dropless, uneven counts, zero tokens on a rank, autograd through both exchanges.

Per chunk of local tokens (mode r >= 1, blocks of r ranks serve E_b = E * r / W experts each):
    sort copies by global expert -> rows of block j are contiguous -> send them to each of the
    r members of block j (one all_to_all_single) -> rows arrive ordered (source, expert) ->
    reorder to (expert, source) -> grouped GEMM -> reverse the reorder -> all_to_all back ->
    one weighted unpermute of all chunks (r partial outputs of a sharded expert are summed).
Mode 0 (data parallel) keeps tokens local and computes with all-gathered expert weights.
Pipelining: every chunk's exchange is started before any is waited on, so chunk c + 1's
dispatch and chunk c - 1's combine are in flight while chunk c's experts run; the shared
experts run while the first dispatch is in flight.

Shape legend: T local tokens, K top-k, D dim, E experts, E_b experts served per block,
W ranks, S rows sent, R rows received, C chunks (d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe import ops
from moe.cpu_memory import pooled_cat
from moe.dispatch import Dispatcher
from moe.parallel.alltoall import (
    PendingExchange,
    all_to_all,
    hierarchical_all_to_all,
    start_all_to_all,
    start_exchange_counts,
    wait_all_to_all,
)
from moe.parallel.sharded_experts import ParallelExperts
from moe.routing.base import Routing


def transpose_segments(counts_SE: torch.Tensor) -> torch.Tensor:
    """Index [R] that reorders rows grouped (source, expert) into (expert, source) order.

    Args:
        counts_SE: [S, E] int64 rows of each (source, expert) segment, segments in row-major order.
    """
    flat = counts_SE.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).reshape(counts_SE.shape)
    cnt_t, start_t = counts_SE.t().reshape(-1), starts.t().reshape(-1)
    total = int(flat.sum())
    new_starts = torch.cumsum(cnt_t, 0) - cnt_t
    within = torch.arange(total, device=counts_SE.device) - torch.repeat_interleave(new_starts, cnt_t)
    return torch.repeat_interleave(start_t, cnt_t) + within


def _reorder(x: torch.Tensor, index: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x[index] (a permutation of rows) by the permute op: its output comes from the C++ ops'
    buffer pool, and its backward gathers instead of index_select's zero-fill + index_add."""
    return x if index is None else ops.permute(x, index, backend)


@dataclass
class ChunkRoute:
    """Everything one chunk's exchange and combine need (plain ints: no device syncs later)."""

    token_idx: torch.Tensor  # [N] int64 token (in the local batch) of each routed copy
    weights: torch.Tensor  # [N] fp32 gate weight of each routed copy
    send_token_idx: torch.Tensor  # [S] token of each sent row (S = N * r: r replicas per copy)
    replica_of: torch.Tensor | None  # [S] copy of each sent row (None: S = N in copy order)
    in_splits: list[int]  # [W] rows sent to each rank
    out_splits: list[int]  # [W] rows received from each rank
    order: torch.Tensor | None  # [R] received (source, expert) order -> (expert, source); None = same
    inverse: torch.Tensor | None  # [R] inverse of order
    counts: torch.Tensor  # [E_b] rows per served expert
    split_matrix: torch.Tensor | None = None  # [W, W] for the hierarchical exchange


@dataclass
class ParallelHandle:
    """What combine needs: the routes of every chunk and the local token count."""

    routes: list[ChunkRoute]
    num_tokens: int
    mode: int


class ExpertParallelDispatcher(Dispatcher):
    """Dispatch/combine across ranks in mode r (0 = data parallel, 1 = EP, > 1 = EP + sharded).

    Args:
        num_experts: E (global).
        group: the expert-parallel process group (None = WORLD).
        backend: op backend for sort/permute/unpermute/grouped_mm.
        local_size: ranks per node for the 2D hierarchical exchange (None = flat all-to-all).
    """

    def __init__(self, num_experts: int, group: Any = None, backend: str = "auto", local_size: int | None = None):
        self.num_experts, self.group, self.backend = num_experts, group, backend
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if local_size is not None and (local_size < 1 or self.world % local_size):
            raise ValueError(f"local_size ({local_size}) must divide the world size ({self.world})")
        self.local_size = local_size if local_size not in (None, 1, self.world) else None

    # -- routing ---------------------------------------------------------------------------
    def _sort(self, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order [N] of the routed copies (flat T * K index) sorted by expert, counts [E])."""
        order, counts_E = ops.sort_by_expert(ids_TK.reshape(-1), self.num_experts, self.backend)
        return order[: int(counts_E.sum())], counts_E

    @staticmethod
    def _copies(order: torch.Tensor, weights_TK: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token [N] in the local batch, gate weight [N]) of each sorted copy."""
        k = weights_TK.shape[1]
        token = order if k == 1 else order // k
        return token if offset == 0 else token + offset, weights_TK.reshape(-1)[order]

    def plan_routes(self, routing: Routing, mode: int, chunks: int) -> list[ChunkRoute]:
        """Sorts each chunk's copies and exchanges the per-expert counts (one small collective)."""
        return self._route_and_send(None, routing, mode, chunks)[0]

    def _route_and_send(
        self, x_TD: torch.Tensor | None, routing: Routing, mode: int, chunks: int
    ) -> tuple[list[ChunkRoute], list[torch.Tensor]]:
        """(every chunk's route, its rows to send [S, D] gathered from x_TD; [] without x_TD)."""
        ids, weights = routing.expert_ids, routing.weights
        total, extra = divmod(ids.shape[0], chunks)
        bounds = [0]
        for c in range(chunks):
            bounds.append(bounds[-1] + total + (c < extra))  # torch.tensor_split's sizes
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))  # [lo, hi) of each chunk's tokens
        sorts = [self._sort(ids[lo:hi]) for lo, hi in spans]
        if mode == 0:
            routes = []
            for (order, counts), (lo, hi) in zip(sorts, spans, strict=True):
                tok, wts = self._copies(order, weights[lo:hi], lo)
                routes.append(ChunkRoute(tok, wts, tok, None, [], [], None, None, counts))
            return routes, self._gather(x_TD, [r.send_token_idx for r in routes])
        w = self.world
        per_block = self.num_experts * mode // w
        counts_CBE = (sorts[0][1] if chunks == 1 else torch.stack([c for _, c in sorts])).view(chunks, w // mode, -1)
        # To rank q: the counts of q's block (every block member serves all of its experts).
        to_ranks = counts_CBE if mode == 1 else counts_CBE.repeat_interleave(mode, dim=1)
        send_WCE = to_ranks.transpose(0, 1).contiguous()
        # Started first: what this rank sends needs only its own counts, what it receives needs
        # the others', which arrive while the rows to send are gathered.
        recv_WCE, counts_work = start_exchange_counts(send_WCE.view(w, -1), self.group)
        block_counts_CB = counts_CBE.sum(2) if per_block > 1 else counts_CBE.view(chunks, -1)
        sends, copies = [], []
        for c, ((order, _), (lo, hi)) in enumerate(zip(sorts, spans, strict=True)):
            tok, wts = self._copies(order, weights[lo:hi], lo)
            copies.append((tok, wts))
            bc = block_counts_CB[c]
            sizes = bc if mode == 1 else bc.repeat_interleave(mode)
            sel = None
            if mode > 1:  # each block's rows once per member: r replicas
                starts = (torch.cumsum(bc, 0) - bc).repeat_interleave(mode)
                within = torch.arange(int(sizes.sum()), device=sizes.device)
                within -= torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
                sel = torch.repeat_interleave(starts, sizes) + within
            sends.append((tok if sel is None else tok[sel], sel, sizes.tolist()))
        sent = self._gather(x_TD, [idx for idx, _, _ in sends])  # overlaps the count exchange
        counts_work.wait()
        recv_WCE = recv_WCE.view(w, chunks, per_block)
        split_matrices = None
        if self.local_size is not None:
            mine_CW = send_WCE.sum(2).t().contiguous()
            gathered = [torch.empty_like(mine_CW) for _ in range(w)]
            dist.all_gather(gathered, mine_CW, group=self.group)
            split_matrices = torch.stack(gathered)  # [W src, C, W dst]
        routes = []
        for c, ((tok, wts), (send_idx, sel, in_splits)) in enumerate(zip(copies, sends, strict=True)):
            rc = recv_WCE[:, c]
            regroup = inverse = None
            if per_block > 1:  # rows arrive (source, expert): regroup by expert
                regroup = transpose_segments(rc)
                inverse = torch.empty_like(regroup)
                inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
            routes.append(
                ChunkRoute(
                    tok,
                    wts,
                    send_idx,
                    sel,
                    in_splits,
                    rc.sum(1).tolist(),
                    regroup,
                    inverse,
                    rc.sum(0),
                    None if split_matrices is None else split_matrices[:, c],
                )
            )
        return routes, sent

    def _gather(self, x_TD: torch.Tensor | None, send_idx: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each chunk's rows to send, gathered from x_TD ([] without x_TD: routes only)."""
        return [] if x_TD is None else [ops.permute(x_TD, idx, self.backend) for idx in send_idx]

    # -- exchanges --------------------------------------------------------------------------
    @staticmethod
    def _splits(route: ChunkRoute, back: bool) -> tuple[list[int], list[int]]:
        """(rows sent to each rank, rows received from each) of the dispatch, or of the combine (back)."""
        return (route.out_splits, route.in_splits) if back else (route.in_splits, route.out_splits)

    def _start(self, x: torch.Tensor, route: ChunkRoute, back: bool) -> Any:
        if route.split_matrix is not None:
            sm = route.split_matrix.t() if back else route.split_matrix
            assert self.local_size is not None
            return hierarchical_all_to_all(x, sm, self.local_size, self.group), None
        return start_all_to_all(x, *self._splits(route, back), self.group)

    def _exchange(self, x: torch.Tensor, route: ChunkRoute, back: bool) -> torch.Tensor:
        """The exchange of _start, synchronous: one autograd node instead of a start and a wait."""
        if route.split_matrix is not None:
            return self._wait(self._start(x, route, back))  # the 2D exchange is synchronous already
        return all_to_all(x, *self._splits(route, back), self.group)

    @staticmethod
    def _wait(started: tuple[torch.Tensor, PendingExchange | None]) -> torch.Tensor:
        buf, pending = started
        return buf if pending is None else wait_all_to_all(buf, pending)

    # -- the seam ---------------------------------------------------------------------------
    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, mode: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, ParallelHandle]:
        """(x_sorted [R, D] rows of this rank's experts sorted by expert, counts [E_b], handle)."""
        (route,), (x_sent,) = self._route_and_send(x_TD, routing, mode, 1)
        if mode == 0:
            return x_sent, route.counts, ParallelHandle([route], x_TD.shape[0], mode)
        x_recv = _reorder(self._exchange(x_sent, route, back=False), route.order, self.backend)
        return x_recv, route.counts, ParallelHandle([route], x_TD.shape[0], mode)

    def combine(self, y_sorted: torch.Tensor, handle: ParallelHandle) -> torch.Tensor:
        """y_sorted [R, D] from dispatch's rows -> y_TD [T, D] (weighted sum in fp32)."""
        (route,) = handle.routes
        if handle.mode != 0:
            y_sorted = self._exchange(_reorder(y_sorted, route.inverse, self.backend), route, back=True)
        return self._unpermute([y_sorted], handle.routes, handle.num_tokens)

    def _unpermute(self, ys: list[torch.Tensor], routes: list[ChunkRoute], num_tokens: int) -> torch.Tensor:
        # Partial outputs of a sharded expert are summed per copy first, so each copy's gate
        # weight multiplies (and receives the gradient of) one full expert output.
        copies = [
            y if r.replica_of is None else y.new_zeros(r.token_idx.shape[0], y.shape[1]).index_add(0, r.replica_of, y)
            for y, r in zip(ys, routes, strict=True)
        ]
        if len(routes) == 1:
            return ops.unpermute(copies[0], routes[0].token_idx, routes[0].weights, num_tokens, self.backend)
        token_idx = torch.cat([r.token_idx for r in routes])
        weights = torch.cat([r.weights for r in routes])
        return ops.unpermute(pooled_cat(copies), token_idx, weights, num_tokens, self.backend)

    def run(  # type: ignore[override]
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ParallelExperts,
        mode: int = 1,
        chunks: int = 1,
        overlap: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dispatch, experts and combine of all chunks, pipelined: (y_TD [T, D], overlap(x_TD) or None).

        `overlap` (the layer's shared experts) runs while the first dispatch is in flight.
        """
        routes, sent = self._route_and_send(x_TD, routing, mode, chunks)
        started = [self._start(x, r, back=False) for x, r in zip(sent, routes, strict=True)] if mode else []
        shared = overlap(x_TD) if overlap is not None else None  # overlaps the dispatch
        weights = experts.weights(mode)
        outs = []
        for c, route in enumerate(routes):
            if mode == 0:
                outs.append(experts(sent[c], route.counts, weights))
                continue
            x_recv = _reorder(self._wait(started[c]), route.order, self.backend)
            y = _reorder(experts(x_recv, route.counts, weights), route.inverse, self.backend)
            outs.append(self._start(y, route, back=True))
        ys = outs if mode == 0 else [self._wait(o) for o in outs]
        return self._unpermute(ys, routes, x_TD.shape[0]), shared


__all__ = ["ExpertParallelDispatcher", "ParallelHandle", "ChunkRoute", "transpose_segments", "all_to_all"]
