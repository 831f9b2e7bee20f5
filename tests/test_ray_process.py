"""The Ray tests, run in a pytest process of their own.

Why: Ray's gRPC and event-engine threads outlive ``ray.shutdown()``. In the one pytest process of the
whole suite, every later test that forks (each DataLoader worker) then forks a process with foreign
native threads, which can copy a lock one of them holds: CI once hung for its whole 90 minutes on the
first DataLoader after the Ray tests. Here the Ray tests run in a child pytest, so this process never
hosts those threads; ``runtime.worker_start_method`` covers the same hazard for users (a notebook that
ran Ray, then trains).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY_TESTS = ["tests/curate/test_curate_ray.py", "tests/caption/test_caption_ray.py"]


def test_ray_tests_pass_in_their_own_process() -> None:
    pytest.importorskip("ray")
    env = {**os.environ, "CLIPFORGE_RAY_PROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", *RAY_TESTS]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    summary = text.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, text[-3000:]


def test_worker_start_method_after_ray() -> None:
    """Once Ray's core is loaded, DataLoader workers start from a fork server, and the one shard loop
    still decodes and reports by key (the dataset, its report and the transform pickle)."""
    pytest.importorskip("ray")
    code = (
        "import sys; from clipforge.runtime import worker_start_method as w; a = w(); "
        "import ray._raylet; b = w(); print(a, b)"
    )
    env = {k: v for k, v in os.environ.items() if k != "CLIPFORGE_WORKER_START"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["None", "forkserver"]
    env["CLIPFORGE_WORKER_START"] = "fork-please"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "CLIPFORGE_WORKER_START" in bad.stderr
