"""Old module paths kept importable after a rename: the old name becomes an alias of the new module.

A shim module (the old file) calls `moved_module(__name__, "new.path")`: it imports the new module,
warns once with a DeprecationWarning pointing at the importing line, and replaces itself in
sys.modules by the new module, so `from old import x`, `import old` and patches of `old.x` all
reach the one real module.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

__all__ = ["moved_module"]


def moved_module(old: str, new: str) -> ModuleType:
    """Makes module `old` an alias of module `new` and warns (DeprecationWarning) that it moved.

    Args:
        old: the deprecated module path (the shim's `__name__`).
        new: the module path that now holds the code.
    Returns:
        the new module, now also `sys.modules[old]`.
    """
    module = importlib.import_module(new)
    # stacklevel 3: moved_module, the shim, then its importer (warnings skips importlib's own frames)
    warnings.warn(f"{old} is deprecated: it was renamed to {new}", DeprecationWarning, stacklevel=3)
    sys.modules[old] = module
    return module
