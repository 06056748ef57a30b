"""Turning a raw kernel function into something launchable on a device.

CUDA: triton.jit (+ triton.autotune over the CUDA configs). CPU: Triton's interpreter, chosen
per call by the tensors' device instead of the process-wide TRITON_INTERPRET switch, so CPU
tests and other code that imports Triton in the same process do not affect each other.
Under the interpreter, autotuning (opt-in, for tests) times configs with a wall clock.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

Launchable = Any  # triton JITFunction | InterpretedFunction | Autotuner: all support kernel[grid](...)


def interpreting(device: torch.device) -> bool:
    """True where kernels run in Triton's interpreter: every non-CUDA device, or TRITON_INTERPRET=1."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def wall_clock_bench(kernel_call: Callable[[], Any], quantiles: Sequence[float] | None = None) -> list[float]:
    """A do_bench for triton.autotune that works without a GPU: 3 timed runs, ms (median for all quantiles)."""
    kernel_call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return [median] * len(quantiles) if quantiles else [median]


def build(
    fn: Callable[..., Any],
    interp: bool,
    configs: Sequence[triton.Config],
    key: Sequence[str],
    autotune: bool,
    prune: Callable[..., Any] | None = None,
    heuristics: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
) -> Launchable:
    """A launchable kernel: interpreted or jitted, autotuned over `configs` keyed on `key` or not.

    `heuristics` derive constexpr arguments from the others and the chosen config (triton.heuristics).
    Callers cache the result (one autotuner per kernel and mode keeps its tuning cache).
    """
    kernel = InterpretedFunction(fn) if interp else triton.jit(fn)
    if heuristics:
        kernel = triton.heuristics(heuristics)(kernel)
    if not autotune:
        return kernel
    prune_by = {"early_config_prune": prune} if prune is not None else None
    bench = wall_clock_bench if interp else None
    return triton.autotune(configs=list(configs), key=list(key), prune_configs_by=prune_by, do_bench=bench)(kernel)
