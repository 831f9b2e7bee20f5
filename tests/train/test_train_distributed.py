"""torchrun with 2 CPU processes (gloo) trains the same as 1 process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_model import torchrun_train


def _run(out: Path, shards: list[str], env: dict, nproc: int, extra: list[str]) -> list[dict]:
    args = ["--steps", "12", "--batch-size", "16", "--lr", "1e-2", *extra]
    hooks = ["--keys-log", str(out / "keys.jsonl")]  # each rank records its keys through TrainHooks
    return torchrun_train(
        out, "py:tiny_model:make_tiny", shards, env, nproc, args, timeout=240, hook_args=hooks
    )


def _keys(out: Path, rank: int) -> dict[int, list[str]]:
    rows = [json.loads(x) for x in (out / f"keys.jsonl.rank{rank}").read_text().splitlines()]
    return {r["step"]: r["keys"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_match_one(loss, flickr_slice, tmp_path, sub_env):
    one = _run(tmp_path / "one", flickr_slice, sub_env, 1, ["--loss", loss])
    two = _run(tmp_path / "two", flickr_slice, sub_env, 2, ["--loss", loss, "--accum", "2"])
    assert [r["step"] for r in two] == list(range(1, 13))
    k1, k2 = _keys(tmp_path / "one", 0), [_keys(tmp_path / "two", r) for r in (0, 1)]
    for step in range(1, 13):  # the two ranks split the one-process global batch, in order
        assert k2[0][step] + k2[1][step] == k1[step] and len(k2[0][step]) == 8
    losses1, losses2 = [r["loss"] for r in one], [r["loss"] for r in two]
    assert losses2 == pytest.approx(losses1, rel=1e-4, abs=1e-5)
    assert losses1[-1] < losses1[0]  # it learns
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in w1:
        assert (w1[k].float() - w2[k].float()).abs().max() < 1e-4, k
