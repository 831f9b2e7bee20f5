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


# every flag `clipforge train` had before the flags were generated from TrainConfig's fields
OLD_FLAGS = [
    ["--model", "scratch:vit-nano"],
    ["--data", "a.tar", "b.tar"],
    ["--output", "runs/x"],
    ["--steps", "3"],
    ["--batch-size", "8"],
    ["--lr", "0.01"],
    ["--wd", "0.2"],
    ["--warmup", "2"],
    ["--loss", "siglip"],
    ["--multi-positive"],
    ["--accum", "2"],
    ["--precision", "bf16"],
    ["--grad-clip", "0.5"],
    ["--grad-checkpointing"],
    ["--compile"],
    ["--fsdp"],
    ["--device", "cpu"],
    ["--workers", "0"],
    ["--shuffle-buffer", "16"],
    ["--cache", "off"],
    ["--cache-dir", "c"],
    ["--save-every", "5"],
    ["--resume"],
    ["--seed", "3"],
    ["--threads", "1"],
    ["--no-progress"],
    ["--model-opt", "unlock_text=2"],
]


def test_every_old_flag_still_works():
    cfg = config_from_args(_parse([a for flag in OLD_FLAGS for a in flag]))
    want = {
        "model": "scratch:vit-nano",
        "data": ["a.tar", "b.tar"],
        "output": "runs/x",
        "steps": 3,
        "batch_size": 8,
        "lr": 0.01,
        "wd": 0.2,
        "warmup": 2,
        "loss": "siglip",
        "multi_positive": 2,
        "accum": 2,
        "precision": "bf16",
        "grad_clip": 0.5,
        "grad_checkpointing": True,
        "compile": True,
        "fsdp": True,
        "device": "cpu",
        "workers": 0,
        "shuffle_buffer": 16,
        "cache": "off",
        "cache_dir": "c",
        "save_every": 5,
        "resume": True,
        "seed": 3,
        "threads": 1,
        "progress": False,
        "model_opts": {"unlock_text": 2},
    }
    assert {k: getattr(cfg, k) for k in want} == want
    assert (
        config_from_args(_parse(["--data", "a", "--epochs", "2", "--multi-positive", "3"])).multi_positive
        == 3
    )


def test_every_field_has_a_flag_with_help():
    from dataclasses import fields, is_dataclass

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    sub = p._subparsers._group_actions[0].choices["train"]
    dests = {a.dest: a for a in sub._actions}

    def check(cls, prefix=""):
        for f in fields(cls):
            if is_dataclass(f.default_factory if callable(f.default_factory) else None):
                check(f.default_factory, f"{prefix}{f.name}.")  # nested config: one flag per sub-field
                continue
            assert prefix + f.name in dests and dests[prefix + f.name].help, prefix + f.name

    check(TrainConfig)
    assert "caption.width" in dests


def test_unknown_model_option_fails_before_training(tmp_path, capsys):
    from clipforge.cli import main

    argv = ["train", "--model", "towers:efficientnet-lite0+minilm-l6", "--model-opt", "image_hed=mlp"]
    with pytest.raises(SystemExit, match=r"'image_hed' \(did you mean 'image_head'\?\)"):
        main([*argv, "--data", "x.tar", "--steps", "1", "--output", str(tmp_path / "run")])
