"""torchrun with 2 CPU processes (gloo) trains the same as 1 process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


def _run(out: Path, shards: list[str], env: dict, nproc: int, extra: list[str]) -> list[dict]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *launch,
        "-m",
        "clipforge.cli",
        "train",
        "--model",
        "py:tiny_model:make_tiny",
        "--model-opt",
        "lock_image=1",
        "--data",
        *shards,
        "--output",
        str(out),
        "--cache-dir",
        str(out.parent / "cache"),
        "--steps",
        "12",
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_match_one(loss, flickr_slice, tmp_path, sub_env):
    one = _run(tmp_path / "one", flickr_slice, sub_env, 1, ["--loss", loss])
    two = _run(tmp_path / "two", flickr_slice, sub_env, 2, ["--loss", loss, "--accum", "2"])
    assert [r["step"] for r in two] == list(range(1, 13))
    losses1, losses2 = [r["loss"] for r in one], [r["loss"] for r in two]
    assert losses2 == pytest.approx(losses1, rel=1e-4, abs=1e-5)
    assert losses1[-1] < losses1[0]  # it learns
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in w1:
        assert (w1[k].float() - w2[k].float()).abs().max() < 1e-4, k
