"""moe.keep_freed_memory: glibc keeps freed memory, so reallocating a large tensor costs no page faults.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

# Faults while allocating, filling and freeing a 64 MiB tensor, in the steady state: glibc's
# aligned allocations fragment the heap for the first few rounds (a few fresh 64 MiB regions).
PROBE = """
import resource, sys, torch, moe
applied = moe.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(12):
    faults_of_one_round()
print(applied, sum(faults_of_one_round() for _ in range(4)))
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@glibc_only
def test_reallocation_page_faults_vanish() -> None:
    pages = (64 << 20) // 4096
    _, default_faults = _probe("default")
    applied, kept_faults = _probe("keep")
    assert applied == "True"
    # glibc defaults: the freed 64 MiB goes back to the OS and every page faults in again.
    assert default_faults > 2 * pages, default_faults
    assert kept_faults < pages // 20, kept_faults


def test_other_c_libraries_get_a_warning_and_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    import moe

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    with pytest.warns(UserWarning, match="needs glibc"):
        assert moe.keep_freed_memory() is False
