"""Compiles the CUDA sources with nvcc on machines without a GPU, so CUDA code cannot rot unseen.

Every .cu file under csrc/ that includes no torch / ATen / c10 header (directly or through a local
header) is compiled with `nvcc -c -std=c++17` and the macros torch's extension build adds, all
files at once in parallel. The torch binding (csrc/cuda/ops_cuda.cu) is compiled by nvcc too,
host and device code, against the installed torch's headers: a CPU-only torch ships ATen/cuda and
c10/cuda but not c10/cuda's generated macro header, which is stubbed (slow: ~1 min on 2 cores).
Skips itself when nvcc is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# What torch.utils.cpp_extension passes to nvcc for every extension.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_TORCH_HEADER = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/|^Python\.h$")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _uses_torch(path: Path, seen: set[Path] | None = None) -> bool:
    """Whether `path` includes a torch header, directly or through a local "..." header."""
    seen = set() if seen is None else seen
    seen.add(path)
    for bracket, name in _INCLUDE.findall(path.read_text()):
        if _TORCH_HEADER.search(name):
            return True
        local = (path.parent / name).resolve()
        if bracket == '"' and local.is_file() and local not in seen and _uses_torch(local, seen):
            return True
    return False


CU_FILES = sorted(CSRC.rglob("*.cu"))
TORCH_FREE = [p for p in CU_FILES if not _uses_torch(p)]
NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, subprocess.CompletedProcess]:
    """nvcc -c of every torch-free .cu file, run in parallel."""
    out = tmp_path_factory.mktemp("nvcc")
    assert NVCC is not None

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        obj = out / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_80", "-lineinfo", *TORCH_NVCC_FLAGS, str(src), "-o", str(obj)]
        return _run(cmd, out)

    with ThreadPoolExecutor(max_workers=max(1, min(len(TORCH_FREE), os.cpu_count() or 1))) as pool:
        return dict(zip(TORCH_FREE, pool.map(compile_one, TORCH_FREE), strict=True))


def test_cuda_kernels_are_torch_free() -> None:
    names = {p.name for p in TORCH_FREE}
    assert {"sort_kernels.cu", "permute_kernels.cu"} <= names, f"torch-free .cu files: {sorted(names)}"
    assert not _uses_torch(CSRC / "cuda" / "kernels.cuh"), "kernels.cuh must stay torch-free"


@needs_nvcc
@pytest.mark.parametrize("src", TORCH_FREE, ids=lambda p: p.relative_to(CSRC).as_posix())
def test_torch_free_cu_file_compiles(src: Path, compiled: dict[Path, subprocess.CompletedProcess]) -> None:
    result = compiled[src]
    assert result.returncode == 0, f"nvcc failed on {src}:\n{result.stderr[-4000:]}"


@pytest.mark.slow
@needs_nvcc
def test_cuda_binding_compiles(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    assert NVCC is not None
    # A CUDA torch ships this generated header; a CPU-only torch does not: stub it there.
    generated = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((Path(p) / generated).is_file() for p in include_paths()):
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("#pragma once\n")
    includes = [str(tmp_path), *include_paths(), sysconfig.get_paths()["include"]]
    # C++20 and the macros torch's extension build uses for current torch headers; sm_90 (Hopper).
    cmd = [NVCC, "-c", "-std=c++20", "-arch=sm_90", "-O1", *TORCH_NVCC_FLAGS]
    cmd += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    cmd += [*(f"-I{i}" for i in includes), str(CSRC / "cuda" / "ops_cuda.cu"), "-o", str(tmp_path / "ops_cuda.o")]
    result = _run(cmd, tmp_path)
    assert result.returncode == 0, f"nvcc failed on ops_cuda.cu:\n{result.stderr[-4000:]}"
