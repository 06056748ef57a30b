"""Builds the `moe` package; kernels/ is installed as moe.kernels.

The C++/CUDA extension moe._C is built from csrc/ when it has sources: C++ always, CUDA when
the installed torch has CUDA and nvcc is found (MOE_BUILD_CUDA=0 skips CUDA). No GPU is probed.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup


def extensions() -> tuple[list, dict]:
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp or os.environ.get("MOE_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (
        bool(cuda_sources)
        and os.environ.get("MOE_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "moe._C",
            cpp + cuda_sources,
            # No -std / -arch for nvcc: torch adds the standard its headers need, and the archs come
            # from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"; unset: torch's choice for the visible GPU).
            extra_compile_args={"cxx": cxx + ["-DMOE_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("moe._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    # ninja (when installed) compiles the sources in parallel (MAX_JOBS); without it torch falls back to
    # one-at-a-time compiles with a warning. The CUDA build needs it: five .cu files one by one take minutes.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="moe-runtime",
    version="0.1.0",
    description="Mixture-of-Experts runtime for PyTorch: layers, routers, kernels, parallelism, offloading",
    python_requires=">=3.10",
    packages=["moe"]
    + [f"moe.{p}" for p in ("routing", "ops", "reference", "integrations", "lora", "parallel", "offload")]
    + ["moe.kernels"],
    package_dir={"moe.kernels": "kernels"},
    install_requires=["torch>=2.6", "safetensors", "tqdm", "numpy"],
    extras_require={"hf": ["transformers>=4.57"], "triton": ["triton"], "deepspeed": ["deepspeed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
