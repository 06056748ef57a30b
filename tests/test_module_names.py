"""Module names and exports: renamed modules keep their old paths (with a DeprecationWarning), and
every public module of moe/ declares `__all__`."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

MOE = Path(__file__).resolve().parent.parent / "moe"

# old path -> new path (issue 14, item 4)
RENAMED = {
    "moe.parallel.comm": "moe.parallel.alltoall",
    "moe.parallel.runtime": "moe.parallel.expert_parallel",
    "moe.parallel.checkpoint": "moe.parallel.sharded_checkpoint",
    "moe.parallel.experts": "moe.parallel.sharded_experts",
    "moe.lora.checkpoint": "moe.lora.adapter_checkpoint",
}

# Modules that were being reworked by parallel work when `__all__` was added everywhere else.
NO_ALL_YET: set[str] = set()


def _public_modules() -> list[Path]:
    return sorted(p for p in MOE.rglob("*.py") if p.name == "__init__.py" or not p.name.startswith("_"))


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_module_path_is_the_new_module_and_warns(old: str) -> None:
    new = importlib.import_module(RENAMED[old])
    parent, _, leaf = old.rpartition(".")
    saved = sys.modules.pop(old, None)
    saved_attr = getattr(sys.modules[parent], leaf, None)
    if saved_attr is not None:
        delattr(sys.modules[parent], leaf)
    try:
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*{RENAMED[old]}") as record:
            exec(compile(f"import {old}", __file__, "exec"), {})  # an import statement in this file
        module = sys.modules[old]
        assert module is new
        assert sys.modules[old] is new
        for name in new.__all__:
            assert getattr(module, name) is getattr(new, name)
        assert any(Path(w.filename).resolve() == Path(__file__).resolve() for w in record), "points at the importer"
    finally:
        if saved is not None:
            sys.modules[old] = saved
        if saved_attr is not None:
            setattr(sys.modules[parent], leaf, saved_attr)


def test_the_package_function_all_to_all_is_not_shadowed_by_a_module() -> None:
    import moe.parallel

    assert callable(moe.parallel.all_to_all)
    assert moe.parallel.all_to_all is importlib.import_module("moe.parallel.alltoall").all_to_all


@pytest.mark.parametrize("path", _public_modules(), ids=lambda p: str(p.relative_to(MOE)))
def test_every_public_module_declares_all(path: Path) -> None:
    rel = str(path.relative_to(MOE))
    tree = ast.parse(path.read_text())
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    if rel in NO_ALL_YET:
        pytest.skip("left to the parallel rework of this module")
    assert "__all__" in assigned or "__all__" in imported, f"moe/{rel} has no __all__"


# Files of the parallel rework that had undocumented public methods when this test was added.
UNDOCUMENTED_YET: set[str] = set()


@pytest.mark.parametrize("path", _public_modules(), ids=lambda p: str(p.relative_to(MOE)))
def test_every_public_function_and_method_has_a_docstring(path: Path) -> None:
    """Constructors are described by their class's docstring; dunders and extra_repr need none."""
    rel = str(path.relative_to(MOE))
    if rel in UNDOCUMENTED_YET:
        pytest.skip("left to the parallel rework of this module")
    missing = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(node.name)
            methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            missing += [
                f"{node.name}.{m.name}"
                for m in methods
                if not m.name.startswith("_") and m.name != "extra_repr" and ast.get_docstring(m) is None
            ]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(node.name)
    assert not missing, f"moe/{rel}: no docstring on {missing}"
