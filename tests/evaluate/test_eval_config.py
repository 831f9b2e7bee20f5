"""EvalConfig (issue 10 §2): strict config, today's flag names generated from fields, the full run
config written beside results.json, legacy keyword arguments, and no partial results without a
process group (issue 10 §1: one rank/world helper)."""

from __future__ import annotations

import argparse

import pytest
import yaml
from evalutils import TinyClip

from clipforge.config import ConfigError
from clipforge.evaluate.config import EvalConfig, eval_config
from clipforge.evaluate.recipes import DatasetSpec
from clipforge.evaluate.runner import evaluate


def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        EvalConfig.from_dict({"batch_sise": 8})
    with pytest.raises(ConfigError):
        EvalConfig.from_dict({"precision": "fp16"})
    with pytest.raises(ConfigError):
        eval_config(None, worker=2)  # a typo in a keyword override fails too


def test_legacy_keywords_map_to_fields(tmp_path):
    cfg = eval_config(None, output_dir=tmp_path / "o", cache=tmp_path / "c", probe_seed=3, tasks=("probe",))
    assert cfg.output == str(tmp_path / "o") and cfg.cache and cfg.cache_dir == str(tmp_path / "c")
    assert cfg.probe_seed == 3 and cfg.tasks == ["probe"]
    assert eval_config({"workers": 0}, batch_size=5) == EvalConfig(workers=0, batch_size=5)


def _parse(argv: list[str]) -> argparse.Namespace:
    from clipforge.evaluate import cli

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli.register(sub)
    return p.parse_args(argv)


def test_todays_flag_names_still_parse():
    from clipforge.evaluate.cli import eval_config_from_args

    args = _parse(["eval", "run", "--model", "m", "--batch-size", "8", "--text-batch-size", "9", "--workers", "0",
                   "--image-size", "160", "--no-channels-last", "--precision", "bf16", "--no-cache",
                   "--hash-contents", "--templates", "simple", "--descriptions", "d.json", "--data-root", "r",
                   "--output", "o", "--k-shot", "4", "--solver", "torch", "--seed", "7"])  # fmt: skip
    cfg = eval_config_from_args(args)
    want = EvalConfig(data_root="r", templates="simple", descriptions="d.json", output="o", batch_size=8,
                      text_batch_size=9, workers=0, image_size=160, channels_last=False, precision="bf16",
                      k_shot=4, solver="torch", probe_seed=7, cache=False, hash_contents=True)  # fmt: skip
    assert cfg == want
    assert eval_config_from_args(_parse(["eval", "retrieval", "--model", "m"])).output == "runs/eval"
    with pytest.raises(SystemExit):  # zero-shot flags are not probe flags
        _parse(["eval", "retrieval", "--model", "m", "--k-shot", "2"])


def test_run_config_written_next_to_results(color_shards, tmp_path):
    shards, cn = color_shards
    spec = DatasetSpec("colors", [str(s) for s in shards], str(cn), "simple", ("zeroshot",))
    out = tmp_path / "out"
    evaluate(TinyClip().eval(), [spec], {"workers": 0, "batch_size": 7}, output_dir=out, progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config"]["batch_size"] == 7 and saved["config"]["workers"] == 0
    assert saved["datasets"][0]["name"] == "colors" and saved["datasets"][0]["shards"] == [
        str(s) for s in shards
    ]
    assert saved["model"] == "test:tiny" and len(saved["model_fingerprint"]) == 16
    assert EvalConfig.from_dict(saved["config"]).output == str(out)  # the file loads back strictly


def test_no_silent_partial_gather_without_process_group(monkeypatch):
    from clipforge.evaluate import dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist.rank_world() == (1, 2)
    with pytest.raises(RuntimeError, match="init_from_env"):
        dist.all_gather_object({"rows": 1})
