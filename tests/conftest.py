"""Shared test helpers: the shape list, tolerances per dtype, a per-token MoE oracle."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, name: str) -> ModuleType:
    """Imports the script at ROOT/path (e.g. "benchmarks/cuda_ops.py") as module `name`, registered
    in sys.modules (dataclasses look their module up while the file executes)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# (T, D, H, E, K): T = 0, E = 1, K = 1, non-power-of-two dims, and experts with no tokens
# (T * K < E guarantees at least one empty expert).
SHAPES = [
    (0, 8, 16, 4, 2),
    (1, 8, 16, 4, 2),
    (3, 12, 20, 8, 1),
    (7, 24, 40, 1, 1),
    (33, 20, 36, 6, 3),
    (100, 16, 24, 5, 4),
]

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """torch.testing.assert_close with the project's tolerance for `dtype` (default: expected's)."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
