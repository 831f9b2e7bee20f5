"""CurateConfig: typed and nested, strict loading, generated flags (old names kept), checked on resume."""

from __future__ import annotations

import json

import pytest
import yaml

from clipforge.config import ConfigError
from clipforge.curate.config import BalanceConfig, CurateConfig, DedupConfig
from clipforge.curate.engine import run_curation
from clipforge.utils import OutputExistsError


def parse_run(argv: list[str]) -> CurateConfig:
    from clipforge.cli import build_parser
    from clipforge.curate.cli import config_from_args

    args = build_parser().parse_args(["curate", "run", "--data", "x.tar", "--output", "o", *argv])
    return config_from_args(args)


def run(shards, out, **kw):
    cfg = kw.pop("cfg", CurateConfig(stages=["text", "image", "dedup"], batch_size=4))
    return run_curation([str(s) for s in shards], out, cfg, progress=False, **kw)


def test_unknown_keys_fail_with_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        CurateConfig.from_dict({"dedup": {"treshold": 0.9}})
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        CurateConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="balance.t must be int"):
        CurateConfig.from_dict({"balance": {"t": "2O000"}})
    with pytest.raises(ConfigError, match="dedup.keep"):
        CurateConfig.from_dict({"dedup": {"keep": "first"}})


def test_flags_generated_and_old_names_kept(tmp_path):
    old = parse_run(
        ["--stages", "text,image,dedup", "--dup-threshold", "0.9", "--eval-threshold", "0.8",
         "--phash-radius", "6", "--keep", "centroid", "--balance-t", "50", "--concepts", "c.txt",
         "--seed", "3", "--batch-size", "8"]
    )  # fmt: skip
    assert old.stages == ["text", "image", "dedup"] and old.batch_size == 8
    assert old.dedup == DedupConfig(
        threshold=0.9, eval_threshold=0.8, phash_radius=6, keep="centroid", seed=3
    )
    assert old.balance == BalanceConfig(t=50, concepts="c.txt", seed=3)
    new = parse_run(
        ["--dedup.threshold", "0.9", "--balance.seed", "4", "--seed", "3", "--stages", "text", "image"]
    )
    assert (new.dedup.threshold, new.dedup.seed, new.balance.seed) == (0.9, 3, 4)
    assert new.stages == ["text", "image"]
    assert parse_run([]) == CurateConfig()  # defaults live in the dataclass only
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"batch_size": 16, "dedup": {"threshold": 0.8, "k": 4}}))
    cfg = parse_run(["--config", str(f), "--dedup.k", "2"])
    assert (cfg.batch_size, cfg.dedup.threshold, cfg.dedup.k) == (16, 0.8, 2)
    f.write_text(yaml.safe_dump({"dedup": {"phash_raduis": 3}}))
    with pytest.raises(ConfigError, match="did you mean 'phash_radius'"):
        parse_run(["--config", str(f)])


def test_full_config_saved_and_resume_with_other_settings_refused(shards, tmp_path):
    out = tmp_path / "out"
    cfg = CurateConfig(stages=["text", "image", "dedup"], batch_size=4, dedup=DedupConfig(phash_radius=6))
    run(shards, out, cfg=cfg)
    saved = json.loads((out / "manifest.json").read_text())["config"]
    assert saved["dedup"]["phash_radius"] == 6 and saved["balance"]["t"] == 20_000
    assert CurateConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    with pytest.raises(ConfigError, match=r"dedup.phash_radius: 6 -> 10"):
        run(shards, out)  # same dir, default dedup settings: would mix two runs
    with pytest.raises(ConfigError, match="balance.t"):
        run(shards, out, cfg=CurateConfig(stages=cfg.stages, dedup=cfg.dedup, balance=BalanceConfig(t=5)))
    s = run(shards, out, cfg=CurateConfig(stages=["text", "image", "dedup"], batch_size=8, dedup=cfg.dedup))
    assert s["shards_resumed"] == 2  # batch size and added stages may change on resume
    s = run(shards, out, overwrite=True)  # start over with the new settings
    assert (
        s["shards_scored"] == 2
        and yaml.safe_load((out / "config.yaml").read_text())["dedup"]["phash_radius"] == 10
    )


def test_cli_resume_mismatch_is_one_clear_line(shards, tmp_path, capsys):
    from clipforge.cli import main

    out = str(tmp_path / "out")
    base = ["curate", "run", "--data", *map(str, shards), "--output", out, "--stages", "text,image,dedup"]
    assert main([*base, "--json"]) == 0
    capsys.readouterr()
    assert main([*base, "--phash-radius", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dedup.phash_radius: 10 -> 4" in err[0] and "--overwrite" in err[0]
    assert main([*base, "--phash-radius", "4", "--overwrite", "--json"]) == 0


def test_run_refuses_a_foreign_non_empty_dir(shards, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a curate run")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(shards, out)
    assert (out / "notes.txt").exists()


def test_legacy_run_dir_without_config_yaml_is_checked_by_its_manifest(shards, tmp_path):
    out = tmp_path / "out"
    run(shards, out, cfg=CurateConfig(stages=["text", "image"], batch_size=4, draft_size=64))
    (out / "config.yaml").unlink()  # as written before config.yaml existed: flat config in manifest.json
    m = json.loads((out / "manifest.json").read_text())
    m["config"] = {k: v for k, v in m["config"].items() if k not in ("dedup", "balance")}
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="draft_size: 64 -> None"):
        run(shards, out, cfg=CurateConfig(stages=["text", "image"]))
    s = run(shards, out, cfg=CurateConfig(stages=["text", "image", "dedup"], draft_size=64))
    assert s["shards_resumed"] == 2 and (out / "config.yaml").exists()
