"""`clipforge train`: flags over YAML, --json contract, the run directory's files."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from clipforge.train.cli import config_from_args, register
from clipforge.train.config import TrainConfig


def _parse(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["train", *argv])


def test_flags_override_yaml(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"model": "scratch:vit-tiny", "data": ["a.tar"], "epochs": 3, "lr": 0.1})
    )
    cfg = config_from_args(
        _parse(
            [
                "--config",
                str(cfg_file),
                "--steps",
                "7",
                "--model-opt",
                "unlock_image=1",
                "--model-opt",
                "image_head=mlp",
                "--grad-clip",
                "0",
            ]
        )
    )
    assert cfg.steps == 7 and cfg.epochs is None and cfg.lr == 0.1 and cfg.grad_clip is None
    assert cfg.model_opts == {"unlock_image": 1, "image_head": "mlp"}


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig.from_any({"data": ["x.tar"]})
    with pytest.raises(ValueError, match=r"unknown train config key .lrr. \(did you mean .lr.\?\)"):
        TrainConfig.from_any({"data": ["x.tar"], "steps": 1, "lrr": 1})


def test_cli_run_json(flickr_slice, tmp_path, capsys, monkeypatch):
    from clipforge.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            "py:tiny_model:make_tiny",
            "--model-opt",
            "lock_image=1",
            "--data",
            *flickr_slice,
            "--output",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--threads",
            "1",
            "--no-progress",
            "--json",
            "--multi-positive",
            "2",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["mode"] == "cached" and result["samples"] == 95 and result["steps"] == 95 // 16
    for name in ("model/model.safetensors", "metrics.jsonl", "curves.png", "config.yaml", "bad_samples.json"):
        assert (out / name).exists(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["multi_positive"] == 2
    assert json.loads((out / "bad_samples.json").read_text())["counts"] == {"corrupt_image": 1}
