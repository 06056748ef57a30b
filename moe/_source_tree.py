"""moe.kernels in a source tree (a plain checkout or an editable install).

The Triton sources live in the top-level kernels/ folder, which has no __init__.py: it is never a
package named `kernels`, so it cannot shadow an installed distribution of that name (the PyPI
`kernels` that transformers 5.x imports) when the repository root is on sys.path. At most it is a
namespace portion, and any installed regular package beats that. The wheel installs the folder as
moe/kernels/ (setup.py's package_dir), where `import moe.kernels` finds it as usual; setuptools'
editable finder and a plain checkout do not, so `import moe` registers the folder here.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path


def register_kernels() -> None:
    """Registers kernels/ beside moe/ as the package moe.kernels, unless moe has its own moe/kernels/.

    Nothing in it is imported (so no Triton): moe.kernels.ops etc. import on first use as usual.
    """
    package_dir = Path(__file__).resolve().parent
    source = package_dir.parent / "kernels"
    if (package_dir / "kernels").is_dir() or not (source / "ops.py").is_file() or "moe.kernels" in sys.modules:
        return
    spec = ModuleSpec("moe.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    package = importlib.util.module_from_spec(spec)  # a namespace-style package: __path__ = [kernels/]
    sys.modules["moe.kernels"] = package
    vars(sys.modules["moe"])["kernels"] = package  # what the import system sets for an imported submodule
