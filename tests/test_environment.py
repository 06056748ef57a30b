"""The checkout as a new user meets it: no folder of ours shadows an installed distribution (the top-level
kernels/ folder vs the PyPI `kernels` that transformers 5.x imports), moe.kernels imports from a plain
checkout, an editable install and a wheel, every script answers --help from the repository root, and
requirements-lock.txt pins every direct requirement within its range.

Each import check runs in a fresh interpreter (subprocess) so that this process's sys.path and
sys.modules prove nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("benchmarks", "examples")
    for p in (ROOT / folder).glob("*.py")
    if "__main__" in p.read_text()
)
LIBRARY_MODULES = {"examples/tiny_lm.py", "benchmarks/bench_harness.py"}  # imported by scripts; not scripts


def run_python(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs sys.executable with `args` in `cwd`; returns stdout, failing the test with stderr on error."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"python {' '.join(args)} (cwd {cwd}) exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


# ---------------------------------------------------------------- kernels/ shadows nothing


def test_kernels_folder_is_no_package() -> None:
    """kernels/ holds the Triton sources but no __init__.py: at most a namespace portion of `kernels`."""
    assert (ROOT / "kernels" / "ops.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow the PyPI `kernels`"


def test_installed_kernels_package_beats_the_folder(tmp_path: Path) -> None:
    """With the root FIRST on sys.path and an installed regular package `kernels` later, the installed one wins.

    Runs without site-packages (-S) and with a stand-in installed package, so it holds whether or not
    the PyPI `kernels` is installed here.
    """
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.append({str(site)!r}); "
        "import kernels; print(kernels.WHO, kernels.__file__)"
    )
    out = run_python(["-S", "-c", code], cwd=ROOT, env=clean_env())
    assert out.split() == ["installed", str(site / "kernels" / "__init__.py")]


def test_without_an_installed_kernels_the_folder_is_only_a_namespace() -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import kernels as k; print(k.__file__, *set(k.__path__))"
    out = run_python(["-S", "-c", code], cwd=ROOT, env=clean_env())
    assert out.split() == ["None", str(ROOT / "kernels")]  # no __init__.py: a namespace, nothing runs


def _kernels_distribution() -> importlib.metadata.Distribution | None:
    """The installed PyPI `kernels`, or None; fails if the installed transformers requires it but it is missing."""
    try:
        return importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        requires = importlib.metadata.requires("transformers") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    needed = [r for r in map(Requirement, requires) if canonicalize_name(r.name) == "kernels" and r.marker is None]
    assert not needed, f"transformers {importlib.metadata.version('transformers')} requires {needed[0]}; not installed"
    return None


@pytest.mark.parametrize("root_on_path", ["cwd", "inserted"])
def test_transformers_hub_kernels_imports_from_the_root(root_on_path: str) -> None:
    """`python -m pytest` / `python -c` put the root (cwd) first; benchmarks and examples insert it."""
    dist = _kernels_distribution()
    if dist is None:
        pytest.skip("the PyPI distribution `kernels` is not installed (transformers 5.x pulls it; make venv does)")
    insert = f"import sys; sys.path.insert(0, {str(ROOT)!r}); " if root_on_path == "inserted" else ""
    code = insert + (
        "import sys, transformers.integrations.hub_kernels, kernels; "
        "assert sys.path[0] in ('', sys.argv[1]), sys.path[:2]; print(kernels.__file__)"
    )
    out = run_python(["-c", code, str(ROOT)], cwd=ROOT, env=clean_env())
    kernels_file = Path(out.strip()).resolve()
    assert kernels_file == Path(str(dist.locate_file("kernels/__init__.py"))).resolve()
    assert ROOT / "kernels" not in kernels_file.parents


# ---------------------------------------------------------------- moe.kernels in every layout


def _copy_source_tree(dest: Path) -> Path:
    """moe/, kernels/ and the build files, as a plain checkout elsewhere (no built extension, no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for folder in ("moe", "kernels"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    return dest


IMPORT_KERNELS = (  # ops imports no Triton; grouped_gemm (which does) is only located
    "import importlib.util, moe, moe.kernels.ops as ops; assert moe.kernels.ops is ops; "
    "gemm = importlib.util.find_spec('moe.kernels.grouped_gemm').origin; "
    "assert gemm == ops.__file__.replace('ops.py', 'grouped_gemm.py'), gemm; print(moe.__file__, ops.__file__)"
)


def test_moe_kernels_from_a_plain_checkout(tmp_path: Path) -> None:
    """Not installed: `import moe` maps moe.kernels to kernels/ beside moe/."""
    src = _copy_source_tree(tmp_path / "checkout")
    out = run_python(["-c", IMPORT_KERNELS], cwd=tmp_path, env=clean_env(PYTHONPATH=str(src)))
    assert out.split() == [str(src / "moe" / "__init__.py"), str(src / "kernels" / "ops.py")]


def test_moe_kernels_from_an_editable_install(tmp_path: Path) -> None:
    """`make venv` installs this checkout editable (setuptools' finder cannot map a folder without __init__.py)."""
    out = run_python(["-c", "import moe; print(moe.__file__)"], cwd=tmp_path, env=clean_env())
    if Path(out.strip()).resolve() != ROOT / "moe" / "__init__.py":
        pytest.skip(f"moe is not installed editable from this checkout (it imports from {out.strip()})")
    out = run_python(["-c", IMPORT_KERNELS], cwd=tmp_path, env=clean_env())
    assert out.split() == [str(ROOT / "moe" / "__init__.py"), str(ROOT / "kernels" / "ops.py")]


def test_wheel_installs_kernels_as_moe_kernels_only(tmp_path: Path) -> None:
    """The wheel has moe/kernels/*.py and no top-level `kernels`; installed, moe.kernels imports from it."""
    src = _copy_source_tree(tmp_path / "src")
    env = clean_env(MOE_BUILD_EXT="0")  # the C++ extension is not what this checks
    build = [
        *("-m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w".split()),
        str(tmp_path / "dist"),
        str(src),
    ]
    run_python(build, cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("moe_runtime-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"moe/kernels/ops.py", "moe/kernels/grouped_gemm.py", "moe/kernels/jit.py"} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")], names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel installs by unpacking
    out = run_python(["-c", IMPORT_KERNELS], cwd=tmp_path, env=clean_env(PYTHONPATH=str(site)))
    assert out.split() == [str(site / "moe" / "__init__.py"), str(site / "moe" / "kernels" / "ops.py")]


# ---------------------------------------------------------------- scripts run from the root


def test_every_script_is_listed() -> None:
    every = {p.relative_to(ROOT).as_posix() for f in ("benchmarks", "examples") for p in (ROOT / f).glob("*.py")}
    assert every - set(SCRIPTS) == LIBRARY_MODULES, "a new file in benchmarks/ or examples/ has no __main__"
    assert len(SCRIPTS) >= 12


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help_from_the_root(script: str) -> None:
    """`python benchmarks/x.py --help` from the root imports everything the script imports, then prints usage."""
    out = run_python([script, "--help"], cwd=ROOT, env=clean_env())
    assert f"usage: {Path(script).name} " in out, out[-2000:]  # DeepSpeed may log a line before it


# ---------------------------------------------------------------- the pinned environment


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_lock_pins_every_direct_requirement_in_range() -> None:
    lock = _requirements(ROOT / "requirements-lock.txt")
    pins = {}
    for req in lock:
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.marker and not req.extras, f"not an exact pin: {req}"
        assert canonicalize_name(req.name) not in pins, f"pinned twice: {req.name}"
        pins[canonicalize_name(req.name)] = spec.version
    for req in _requirements(ROOT / "requirements-dev.txt"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not pinned in requirements-lock.txt (run make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, outside {req}"
    # torch and triton come from TORCH_SPEC / TRITON_SPEC (or an installed CUDA build), never from the lock
    held_out = [n for n in pins if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert not held_out, held_out
    if int(pins["transformers"].split(".")[0]) >= 5:
        assert "kernels" in pins, "transformers 5.x imports the PyPI `kernels`; the lock must pin it"


def test_installed_versions_match_the_lock() -> None:
    """`make test` sets MOE_LOCK to the lock `make venv` installed with: every pin is what is installed."""
    lock = os.environ.get("MOE_LOCK")
    if not lock:
        pytest.skip("MOE_LOCK is not set (make test sets it; make test-latest and LOCK= do not pin)")
    wrong = []
    for req in _requirements(ROOT / lock):
        (spec,) = req.specifier
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != spec.version:
            wrong.append(f"{req.name}: locked {spec.version}, installed {installed}")
    assert not wrong, "the venv differs from the lock (rm -r .venv; make venv):\n" + "\n".join(wrong)
