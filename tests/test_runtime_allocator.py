"""The allocator settings every clipforge process applies (clipforge.runtime.tune_allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

from clipforge import runtime

INT_MAX = 2**31 - 1  # mallopt takes an int


def test_every_setting_is_applied_as_written() -> None:
    """A value above mallopt's int range was silently cut (the 4 GiB trim threshold became 2 GiB while the
    pad stayed 1 GiB, so a forward pass peaking above 1 GiB was trimmed and faulted back every batch)."""
    for name, value in runtime.ALLOCATOR_ENV.items():
        assert 0 <= int(value) <= INT_MAX, name


def test_a_trim_keeps_at_least_what_starts_a_trim() -> None:
    """After a trim glibc keeps TOP_PAD of free heap; a trim starts above TRIM_THRESHOLD. With the pad
    below the threshold, transient memory between the two is returned and faulted in again each batch."""
    env = runtime.ALLOCATOR_ENV
    assert int(env["MALLOC_TOP_PAD_"]) >= int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"


def test_tune_allocator_applies_and_exports_to_children() -> None:
    code = (
        "import os; from clipforge import runtime; ok = runtime.tune_allocator(); "
        "print(ok, os.environ['MALLOC_TOP_PAD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ok, pad, trim = out.stdout.split()
    assert ok == "True" and int(pad) == int(trim) == INT_MAX
    env["CLIPFORGE_MALLOC"] = "0"  # off: nothing applied, nothing exported
    code_off = (
        "import os; from clipforge import runtime; "
        "print(runtime.tune_allocator(), 'MALLOC_TOP_PAD_' in os.environ)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code_off], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
