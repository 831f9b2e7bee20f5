"""The run directory across runs: a resume checks the config it continues, a killed run's temp files
are cleaned, a shard list read back from a run's config.yaml never runs a command, hooks are called."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from clipforge.config import ConfigError
from clipforge.train import train
from clipforge.train.cli import config_from_args, register
from clipforge.train.hooks import TrainHooks


def _cfg(out: Path, shards: list[str], **kw) -> dict:
    return {
        "model": "py:tiny_model:make_tiny",
        "model_opts": {"lock_image": 1},
        "data": shards,
        "output": str(out),
        "steps": 4,
        "batch_size": 8,
        "save_every": 2,
        "workers": 0,
        "threads": 1,
        "progress": False,
        "tensorboard": False,
        **kw,
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["train", *argv])


def test_hooks_see_every_step_and_batch(flickr_slice, tmp_path):
    seen, ended = [], []
    hooks = TrainHooks(on_batch=lambda s, b, r: seen.append((s, len(b["keys"]), r)), on_step_end=ended.append)
    r = train(_cfg(tmp_path / "run", flickr_slice), hooks=hooks)
    assert r["steps"] == 4 and seen == [(s, 8, 0) for s in (1, 2, 3, 4)] and ended == [1, 2, 3, 4]


def test_resume_checks_the_run_config(flickr_slice, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, flickr_slice, steps=2))
    with pytest.raises(ConfigError, match=r"lr: 0\.0005 -> 0\.01"):
        train(_cfg(out, flickr_slice, steps=4, resume=True, lr=1e-2))
    with pytest.raises(ConfigError, match="model_opts"):
        train(_cfg(out, flickr_slice, steps=4, resume=True, model_opts={"lock_image": 1, "dropout": 0.1}))
    r = train(_cfg(out, flickr_slice, steps=4, resume=True, progress=True, log_every=2))  # may change
    assert r["steps"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 4]


def test_killed_runs_temp_files_are_cleaned(flickr_slice, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, flickr_slice, steps=2))
    stale = [
        out / "checkpoints" / ".step-0000003.k2j4.tmp",  # a checkpoint being written
        out / ".model.x8a.tmp",  # a final model being saved
        out / ".result.json.abc.tmp",
    ]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_text("{")
    keep = out / "notes.tmp"  # not ours: OUTPUT's top level is cleaned of our hidden names only
    keep.write_text("mine")
    train(_cfg(out, flickr_slice, steps=4, resume=True))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"


def test_resume_from_the_run_config_refuses_a_pipe_shard(flickr_slice, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, flickr_slice, steps=2))
    with pytest.raises(ConfigError, match="runs code: not taken from a file"):  # py: read back from a file
        config_from_args(_parse(["--output", str(out), "--resume", "--steps", "4"]))
    model = ["--model", "py:tiny_model:make_tiny"]  # (a scratch:/towers:/hf: spec needs no flag)
    cfg = config_from_args(_parse([*model, "--output", str(out), "--resume", "--steps", "4"]))
    assert cfg.data == flickr_slice and cfg.model_opts == {"lock_image": 1} and cfg.steps == 4
    assert train(cfg)["steps"] == 4

    saved = yaml.safe_load((out / "config.yaml").read_text())
    pwned = tmp_path / "pwned"
    saved["data"] = [*flickr_slice, f"pipe:touch {pwned}; cat {flickr_slice[0]}"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match="refusing shard spec 'pipe:touch"):
        config_from_args(_parse([*model, "--output", str(out), "--resume", "--steps", "6"]))
    assert not pwned.exists()
    # given on the command line, a pipe: spec is the user's own choice (and still honoured)
    ok = config_from_args(
        _parse(["--data", f"pipe:cat {flickr_slice[0]}", "--output", str(out), "--steps", "1"])
    )
    assert ok.data == [f"pipe:cat {flickr_slice[0]}"]
