"""kill -9 a training run after a checkpoint, resume it, and compare with an uninterrupted run:
same final weights, and exactly the same samples per step (no repeats, no gaps)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HOOKS_SCRIPT = Path(__file__).resolve().parent / "train_with_hooks.py"


def _train(out: Path, shards: list[str], env: dict, extra: list[str], kill_at: int = 0, resume: bool = False):
    cmd = [
        sys.executable,
        str(HOOKS_SCRIPT),
        "--keys-log",
        str(out / "keys.jsonl"),
        "--kill-at",
        str(kill_at),
        "--",
        "--model",
        "py:tiny_model:make_tiny",
        "--data",
        *shards,
        "--output",
        str(out),
        "--steps",
        "16",
        "--batch-size",
        "8",
        "--save-every",
        "5",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--no-progress",
        "--json",
        *extra,
    ]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _keys_by_step(out: Path) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in (out / "keys.jsonl.rank0").read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["keys"]  # a resumed run's record of a step replaces the killed run's
    return steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,extra,start",
    [
        ("streaming", ["--workers", "2", "--shuffle-buffer", "16"], ""),
        ("cached", ["--workers", "1", "--model-opt", "lock_image=1", "--model-opt", "lock_text=1"], ""),
        # workers from a fork server (what a process that loaded Ray uses): a kill -9 of the command must
        # take the server and its workers along (else they hold its stdout open: a timeout here)
        ("streaming", ["--workers", "2", "--shuffle-buffer", "16"], "forkserver"),
    ],
)
def test_kill9_resume_is_exact(mode, extra, start, flickr_slice, tmp_path, sub_env):
    sub_env = {**sub_env, "CLIPFORGE_WORKER_START": start}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = _train(ref, flickr_slice, sub_env, extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["mode"] == mode

    killed = _train(cut, flickr_slice, sub_env, extra, kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-0000005"
    assert not (cut / "model").exists()
    resumed = _train(cut, flickr_slice, sub_env, extra, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    w_ref, w_cut = (
        load_file(str(ref / "model" / "model.safetensors")),
        load_file(str(cut / "model" / "model.safetensors")),
    )
    assert w_ref.keys() == w_cut.keys()
    for k in w_ref:
        assert (w_ref[k].float() - w_cut[k].float()).abs().max() <= 1e-5, k
    moved = load_file(str(tmp_path / "ref" / "checkpoints" / "step-0000016" / "model.safetensors"))
    assert moved.keys() == w_ref.keys()

    ref_steps, cut_steps = _keys_by_step(ref), _keys_by_step(cut)
    assert sorted(ref_steps) == list(range(1, 17)) and cut_steps == ref_steps
    first_epoch = [k for s in range(1, 12) for k in ref_steps[s]]  # 88 of 95 usable samples
    assert len(first_epoch) == len(set(first_epoch)) == 88

    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-5)
    bad = json.loads((cut / "bad_samples.json").read_text())
    assert bad["counts"].get("corrupt_image") == 1
