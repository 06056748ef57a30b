"""Copy-or-compute cost model for a cache miss (the Fiddler idea), from measured speeds.

A missed expert with n tokens can be copied to the device and run there, or run where it
lives (the CPU) with only the n activations crossing the bus. Pick the cheaper:
    t_copy = expert_bytes / h2d_bandwidth + flops(n) / device_flops
    t_cpu  = flops(n) / cpu_flops + 2 * n * D * act_bytes / h2d_bandwidth
with flops(n) = 2 * n * (D * F + H * D).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["CostModel", "measure"]


@dataclass(frozen=True)
class CostModel:
    """Measured speeds: bytes/s host -> device, FLOP/s of the CPU and of the device."""

    h2d_bytes_per_s: float
    cpu_flops: float
    device_flops: float

    def copy_seconds(self, expert_bytes: int, rows: int, expert_flops_per_row: int) -> float:
        """Estimated seconds to copy one expert to the device and run `rows` token rows there."""
        return expert_bytes / self.h2d_bytes_per_s + rows * expert_flops_per_row / self.device_flops

    def cpu_seconds(self, rows: int, expert_flops_per_row: int, activation_bytes_per_row: int) -> float:
        """Estimated seconds to run `rows` token rows on the CPU, activations copied there and back."""
        return rows * expert_flops_per_row / self.cpu_flops + 2 * rows * activation_bytes_per_row / self.h2d_bytes_per_s

    def compute_on_cpu(
        self, expert_bytes: int, rows: int, expert_flops_per_row: int, activation_bytes_per_row: int
    ) -> bool:
        """True when computing the miss on the CPU is cheaper than copying the expert."""
        return self.cpu_seconds(rows, expert_flops_per_row, activation_bytes_per_row) < self.copy_seconds(
            expert_bytes, rows, expert_flops_per_row
        )


def _median_seconds(fn: object, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(device: torch.device, dim: int = 1024, nbytes: int = 32 << 20) -> CostModel:
    """Times a host -> device copy of nbytes and a [64, dim] x [dim, dim] matmul on CPU and device."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=cuda and torch.cuda.is_available())
    dev = torch.empty_like(host, device=device)

    def copy() -> None:
        dev.copy_(host, non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)

    copy()
    h2d = nbytes / max(_median_seconds(copy), 1e-9)
    a, b = torch.randn(64, dim), torch.randn(dim, dim)
    flops = 2 * 64 * dim * dim
    a @ b
    cpu = flops / max(_median_seconds(lambda: a @ b), 1e-9)
    if cuda:
        da, db = a.to(device), b.to(device)

        def mm() -> None:
            da @ db
            torch.cuda.synchronize(device)

        mm()
        dev_flops = flops / max(_median_seconds(mm), 1e-9)
    else:
        dev_flops = cpu
    return CostModel(h2d, cpu, dev_flops)
