"""Differentiable all_to_all_single (sync and async), the 2D hierarchical variant, config checks.

Only `dist.all_to_all_single` with per-rank split sizes is used: it works with uneven splits on
gloo and NCCL, while the list-style `dist.all_to_all` fails on gloo with unequal sizes.
A "sub-group" exchange is a world all_to_all_single with zero splits for ranks outside it, so
no extra process groups are needed.

Shape legend: N rows sent, M rows received, W ranks.

(The module is `alltoall`, not `all_to_all`, so that it never shadows the function
moe.parallel.all_to_all that the package exports; it was moe.parallel.comm before.)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from moe.cpu_memory import pooled_cat, pooled_empty

__all__ = [
    "PendingExchange",
    "start_all_to_all",
    "wait_all_to_all",
    "all_to_all",
    "collective_device",
    "warn_if_device_unset",
    "exchange_counts",
    "start_exchange_counts",
    "hierarchical_all_to_all",
    "check_same_config",
]


class PendingExchange:
    """The in-flight state of one async all-to-all: forward work, backward work and result."""

    def __init__(self, in_splits: list[int], out_splits: list[int], group: Any) -> None:
        self.in_splits, self.out_splits, self.group = in_splits, out_splits, group
        self.work: Any = None
        self.grad_work: Any = None
        self.grad_in: torch.Tensor | None = None
        self.plain = False  # True: started without autograd nodes (nothing needed a gradient)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, async_op: bool):  # type: ignore[no-untyped-def]
    out = pooled_empty((sum(out_splits), *x.shape[1:]), x)  # the same size every step: reused on CPU
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=async_op)
    return out, work


class _Start(torch.autograd.Function):
    """Launches the exchange; the returned buffer is valid only after _Wait."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: PendingExchange) -> torch.Tensor:  # type: ignore[override]
        ctx.pending, ctx.rows = pending, x.shape
        out, pending.work = _exchange(x, pending.out_splits, pending.in_splits, pending.group, True)
        return out

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):  # type: ignore[override]
        pending: PendingExchange = ctx.pending
        if pending.grad_work is not None:  # launched by _Wait.backward, overlapping other work
            pending.grad_work.wait()
        grad, pending.grad_in, pending.grad_work = pending.grad_in, None, None
        return grad, None


class _Wait(torch.autograd.Function):
    """Waits for the exchange; its backward launches the reverse exchange asynchronously."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, pending: PendingExchange) -> torch.Tensor:  # type: ignore[override]
        ctx.pending = pending
        pending.work.wait()
        pending.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        pending: PendingExchange = ctx.pending
        pending.grad_in, pending.grad_work = _exchange(
            grad_out.contiguous(), pending.in_splits, pending.out_splits, pending.group, True
        )
        return grad_out, None


def start_all_to_all(
    x_ND: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group: Any = None
) -> tuple[torch.Tensor, PendingExchange]:
    """Starts a differentiable all_to_all_single; call wait_all_to_all before reading the result.

    Args:
        x_ND: [N, ...] rows ordered by destination rank; N = sum(in_splits).
        in_splits: [W] rows sent to each rank.
        out_splits: [W] rows received from each rank.

    Returns:
        (buffer [M, ...], pending). The backward runs the reverse exchange (splits swapped).
    """
    pending = PendingExchange([int(s) for s in in_splits], [int(s) for s in out_splits], group)
    if not _needs_grad(x_ND):  # no graph to record: the two autograd nodes would only cost time
        pending.plain = True
        out, pending.work = _exchange(x_ND, pending.out_splits, pending.in_splits, group, True)
        return out, pending
    return _Start.apply(x_ND, pending), pending


def wait_all_to_all(buffer: torch.Tensor, pending: PendingExchange) -> torch.Tensor:
    """Waits for start_all_to_all's exchange and returns its [M, ...] result (differentiable)."""
    if pending.plain:
        pending.work.wait()
        pending.work = None
        return buffer
    return _Wait.apply(buffer, pending)


class _Exchange(torch.autograd.Function):
    """A synchronous exchange as one autograd node (the backward is the reverse exchange)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, in_splits: list[int], out_splits: list[int], group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _exchange(x, out_splits, in_splits, group, False)[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        in_splits, out_splits = ctx.splits
        return _exchange(grad_out.contiguous(), in_splits, out_splits, ctx.group, False)[0], None, None, None


def all_to_all(
    x_ND: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group: Any = None
) -> torch.Tensor:
    """Synchronous differentiable all_to_all_single: [N, ...] -> [M, ...]."""
    ins, outs = [int(s) for s in in_splits], [int(s) for s in out_splits]
    if not _needs_grad(x_ND):
        return _exchange(x_ND, outs, ins, group, False)[0]
    return _Exchange.apply(x_ND, ins, outs, group)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def collective_device(group: Any = None) -> torch.device:
    """Where a collective's small bookkeeping tensors must live: the current accelerator for
    NCCL-like backends (they reject CPU tensors), the CPU for gloo and MPI."""
    backend = str(dist.get_backend(group))
    if any(name in backend for name in ("nccl", "hccl", "xccl")):
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None:
            return torch.device(accelerator.type, torch.get_device_module(accelerator.type).current_device())
    return torch.device("cpu")


def warn_if_device_unset(group: Any = None) -> None:
    """Under NCCL every rank must work on its own GPU: torchrun's LOCAL_RANK says which. When a
    process sees several GPUs and the current one is not LOCAL_RANK's, every rank's bookkeeping
    tensors would land on one GPU (NCCL then fails with an unclear error or hangs)."""
    if "nccl" not in str(dist.get_backend(group)) or not torch.cuda.is_available():
        return
    local = os.environ.get("LOCAL_RANK")
    if local is None or torch.cuda.device_count() <= int(local):
        return  # not launched by torchrun, or one GPU per process (CUDA_VISIBLE_DEVICES)
    if torch.cuda.current_device() != int(local):
        warnings.warn(
            f"LOCAL_RANK is {local} but the current CUDA device is {torch.cuda.current_device()}: call "
            "torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) before building expert-parallel layers",
            stacklevel=3,
        )


def exchange_counts(counts_WC: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Row w of counts_WC [W, C] (int64) goes to rank w; returns [W, C], row s from rank s."""
    out, work = start_exchange_counts(counts_WC, group)
    work.wait()
    return out


def start_exchange_counts(counts_WC: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, Any]:
    """exchange_counts started asynchronously: (result [W, C], work); read the result after work.wait()."""
    send = counts_WC.contiguous()
    out = torch.empty_like(send)  # row-major like the rows the exchange writes (empty_like keeps a transpose's strides)
    work = dist.all_to_all_single(out, send, group=group, async_op=True)
    return out, work


def hierarchical_all_to_all(
    x_ND: torch.Tensor, split_matrix_WW: torch.Tensor, local_size: int, group: Any = None
) -> torch.Tensor:
    """2D all-to-all: intra-node exchange, then inter-node exchange among equal local ranks.

    Same result as all_to_all(x, split_matrix[rank], split_matrix[:, rank]); ranks are
    numbered node-major (rank = node * local_size + local). Each step is a world
    all_to_all_single whose splits are zero outside the step's peers; on a real cluster the
    second step crosses nodes with local_size-times fewer, larger messages.

    Args:
        x_ND: [N, ...] rows ordered by destination rank.
        split_matrix_WW: [W, W] int64, [s, d] = rows rank s sends to rank d (same on all ranks).
        local_size: L, ranks per node; W must be a multiple of L.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world % local_size:
        raise ValueError(f"world size ({world}) must be a multiple of local_size ({local_size})")
    nodes, (node, local) = world // local_size, divmod(rank, local_size)
    sm = split_matrix_WW.tolist()

    def dest(n: int, loc: int) -> int:
        return n * local_size + loc

    # Step 1: send to local peer l2 (same node) the rows for ranks (n2, l2), ordered by n2.
    pieces = list(torch.split(x_ND, sm[rank]))
    send1 = [pieces[dest(n2, l2)] for l2 in range(local_size) for n2 in range(nodes)]
    in1 = [0] * world
    out1 = [0] * world
    for l2 in range(local_size):
        in1[dest(node, l2)] = sum(sm[rank][dest(n2, l2)] for n2 in range(nodes))
        out1[dest(node, l2)] = sum(sm[dest(node, l2)][dest(n2, local)] for n2 in range(nodes))
    recv1 = all_to_all(pooled_cat(send1) if send1 else x_ND, in1, out1, group)
    # recv1: from each local source l1, rows for (n2, local) ordered by n2.
    sizes1 = [sm[dest(node, l1)][dest(n2, local)] for l1 in range(local_size) for n2 in range(nodes)]
    parts1 = list(torch.split(recv1, sizes1))
    # Step 2: send to (n2, local) the rows from every local source l1, ordered by l1.
    send2 = [parts1[l1 * nodes + n2] for n2 in range(nodes) for l1 in range(local_size)]
    in2 = [0] * world
    out2 = [0] * world
    for n2 in range(nodes):
        in2[dest(n2, local)] = sum(sm[dest(node, l1)][dest(n2, local)] for l1 in range(local_size))
        out2[dest(n2, local)] = sum(sm[dest(n2, l1)][rank] for l1 in range(local_size))
    return all_to_all(pooled_cat(send2) if send2 else recv1, in2, out2, group)


def check_same_config(fingerprint: dict[str, int], group: Any = None, what: str = "MoE layer") -> None:
    """Raises ValueError on every rank if the ranks' configs differ (one all_gather).

    Args:
        fingerprint: integer fields that must agree across ranks, e.g. num_experts, dim.
    """
    names = sorted(fingerprint)
    mine = torch.tensor([int(fingerprint[n]) for n in names], dtype=torch.int64, device=collective_device(group))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    bad = [n for i, n in enumerate(names) if not bool((table[:, i] == table[0, i]).all())]
    if bad:
        detail = "; ".join(
            f"{n}: " + ", ".join(f"rank {r}={int(table[r, names.index(n)])}" for r in range(world)) for n in bad
        )
        raise ValueError(
            f"{what} config differs across ranks ({detail}); build the layer with the same arguments on every rank"
        )
