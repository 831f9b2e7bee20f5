"""Near-copy detection (issue 13): synthetic copies, descriptor calibration, the copy stage in dedup."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curate_testutils import CAPTIONS, TinyClip, image_bytes, write_shard
from PIL import Image

from clipforge.config import ConfigError
from clipforge.curate.config import CurateConfig, DedupConfig
from clipforge.curate.copydetect import (
    HELDOUT_KINDS,
    KINDS,
    calib_pick,
    calibrate_from_rows,
    calibrate_threshold,
    center_normalize,
    heldout_copy,
    image_descriptors,
    key_rng,
    lowpass,
    make_copy,
    pool_features,
    synthetic_copy,
)
from clipforge.curate.dedup import combine_near
from clipforge.curate.engine import run_curation


class PooledTiny(TinyClip):
    """TinyClip with a frozen 'trunk': 6x6 average-pooled pixels as the pre-head features."""

    def image_features(self, pixels):
        return {"pooled": F.adaptive_avg_pool2d(pixels, 6).flatten(1)}

    def image_head(self, feats):
        return self.img(feats["pooled"][:, :48])


@pytest.fixture(scope="module")
def pooled_model() -> PooledTiny:
    return PooledTiny().eval()


def tiny_images(n: int, size: int = 64) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image_bytes(k, size=size))).convert("RGB") for k in range(n)]


def descriptors(model, images) -> np.ndarray:
    return image_descriptors(model, torch.stack([model.preprocess(im) for im in images]))


def test_synthetic_copies_are_mild_and_deterministic():
    img = tiny_images(1, 100)[0]
    for kind in KINDS:
        a = synthetic_copy(img, kind, key_rng("k", 0))
        b = synthetic_copy(img, kind, key_rng("k", 0))
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    crop = synthetic_copy(img, "crop", key_rng("k", 1))
    assert 90 <= crop.size[0] < 100 and 90 <= crop.size[1] < 100  # crop <= 10% of each side
    with pytest.raises(ValueError, match="unknown copy kind"):
        synthetic_copy(img, "rotate", key_rng("k", 0))
    picks = [calib_pick(f"key{i}", 0.2, 0) for i in range(2000)]
    assert 0.16 < np.mean([p is not None for p in picks]) < 0.24
    assert {p for p in picks if p} == set(KINDS)
    assert picks == [calib_pick(f"key{i}", 0.2, 0) for i in range(2000)]
    assert calib_pick("key1", 0.0, 0) is None


def test_heldout_copies_are_outside_calibration_and_do_what_they_say():
    img = tiny_images(1, 100)[0]
    px = np.asarray(img)
    assert not set(HELDOUT_KINDS) & set(KINDS)
    assert {calib_pick(f"key{i}", 1.0, 0) for i in range(500)} <= set(KINDS)  # calibration never picks them
    for kind in HELDOUT_KINDS:
        a = heldout_copy(img, kind, key_rng("k", 0))
        assert a.mode == "RGB" and np.array_equal(
            np.asarray(a), np.asarray(heldout_copy(img, kind, key_rng("k", 0)))
        )
        assert a.size != img.size or not np.array_equal(np.asarray(a), px), kind
        assert np.array_equal(np.asarray(make_copy(img, kind, key_rng("k", 0))), np.asarray(a))
    assert np.array_equal(np.asarray(heldout_copy(img, "flip", key_rng("k", 0))), px[:, ::-1])
    gray = np.asarray(heldout_copy(img, "grayscale", key_rng("k", 0))).astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for seed in range(5):
        w, h = heldout_copy(img, "crop_large", key_rng("k", seed)).size
        assert 80 <= w <= 90 and 80 <= h <= 90  # 10-20% of each side removed
        w, h = heldout_copy(img, "downscale", key_rng("k", seed)).size
        assert 25 <= w <= 40 and w == h
        w, h = heldout_copy(img, "pad", key_rng("k", seed)).size
        assert min(w, h) == 100 and 110 <= max(w, h) <= 130  # a 5-15% border on two opposite sides
    assert np.array_equal(
        np.asarray(make_copy(img, "crop", key_rng("k", 0))),
        np.asarray(synthetic_copy(img, "crop", key_rng("k", 0))),
    )
    with pytest.raises(ValueError, match="unknown held-out copy kind"):
        heldout_copy(img, "resize", key_rng("k", 0))


def test_lowpass_removes_fine_detail_only():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(lowpass(flat, 2.0), flat, atol=1e-6)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    out = lowpass(checker, 2.0)
    assert out.shape == checker.shape and out.std() < 0.1 * checker.std()  # finest pattern averaged out
    halves = torch.zeros(1, 3, 16, 16)
    halves[..., 8:] = 1.0
    assert lowpass(halves, 2.0)[..., :6].max() < 0.05 and lowpass(halves, 2.0)[..., 10:].min() > 0.95
    assert lowpass(checker, 1.0) is checker


def test_near_copies_benchmark_kinds_option():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import near_copies

    assert near_copies.parse_kinds(["calibrated"]) == KINDS
    assert near_copies.parse_kinds(["all"]) == KINDS + HELDOUT_KINDS
    assert near_copies.parse_kinds(["flip", "calibrated", "flip"]) == ("flip", *KINDS)
    with pytest.raises(SystemExit, match="unknown kind"):
        near_copies.parse_kinds(["mirror"])


def test_pool_features_shapes():
    x = torch.rand(2, 5, 7)
    assert pool_features({"pooled": torch.ones(2, 3)}).shape == (2, 3)
    assert pool_features({"tokens": x}).shape == (2, 7)  # GeM over tokens
    assert pool_features({"x": torch.rand(2, 7, 3, 3)}).shape == (2, 7)
    assert pool_features({"pixels": torch.rand(2, 3, 8, 8)}) is None


def test_calibrate_threshold_targets_precision():
    rng = np.random.default_rng(0)
    pos = rng.normal(0.85, 0.05, 300)
    neg = rng.normal(0.35, 0.1, 600)
    res = calibrate_threshold(pos, neg, precision=0.99)
    t = res["threshold"]
    tp, fp = (pos >= t).sum(), (neg >= t).sum()
    assert tp / (tp + fp) >= 0.99 and res["recall"] >= 0.99
    assert neg.max() < 0.8 and t < pos.min() + 1e-9  # every copy kept, the cut below them all
    # overlapping distributions: precision still holds, recall pays
    res = calibrate_threshold(rng.normal(0.6, 0.1, 300), rng.normal(0.45, 0.1, 600), 0.99)
    assert res["precision"] >= 0.99 and res["recall"] < 0.6
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]), neg)


def test_calibration_for_the_or_rule_leaves_covered_copies_to_phash():
    """Copies pHash catches (here the weak-descriptor half) do not pull the descriptor cut down."""
    rng = np.random.default_rng(3)
    pos = np.concatenate([rng.normal(0.55, 0.05, 200), rng.normal(0.9, 0.02, 200)])
    covered = np.arange(400) < 200
    neg = rng.normal(0.35, 0.08, 800)
    alone = calibrate_threshold(pos, neg, 0.99)
    both = calibrate_threshold(pos, neg, 0.99, covered)
    assert both["recall"] == 1.0 and both["covered_by_other"] == 200
    assert both["threshold"] > alone["threshold"] + 0.1 and alone["recall"] < 1.0  # cut stays high
    assert (neg >= both["threshold"]).sum() == 0


def test_calibration_separates_synthetic_copies_on_tiny_images(pooled_model):
    """Calibrated on one seed of copies, the cut catches another seed's copies and no distinct pair."""
    imgs = tiny_images(100)
    unit, mean = center_normalize(descriptors(pooled_model, imgs))
    kinds = [KINDS[i % len(KINDS)] for i in range(len(imgs))]

    def copies(seed: int) -> np.ndarray:
        augs = [synthetic_copy(im, k, key_rng(str(i), seed)) for i, (im, k) in enumerate(zip(imgs, kinds))]
        return center_normalize(descriptors(pooled_model, augs), mean)[0]

    res = calibrate_from_rows(unit, copies(0), kinds, precision=0.99)
    t = res["threshold"]
    assert res["recall"] >= 0.95 and set(res["recall_by_kind"]) == set(KINDS)
    held_out = (unit * copies(1)).sum(1)  # a different draw of copies
    assert (held_out >= t).mean() >= 0.95
    sims = unit @ unit.T
    np.fill_diagonal(sims, -1)
    assert (sims >= t).sum() <= 2  # distinct images: at most one false pair


def test_combine_near_rules():
    ph = (np.array([0, 2]), np.array([1, 3]))
    de = (np.array([1, 4]), np.array([0, 5]))
    assert len(combine_near(6, ph, de, "or")[0]) == 4
    i, j = combine_near(6, ph, de, "and")
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1)]
    assert combine_near(6, ph, de, "phash") is ph and combine_near(6, ph, de, "descriptor") is de


def test_copy_config_keys_strict():
    with pytest.raises(ConfigError, match="did you mean 'copy_threshold'"):
        CurateConfig.from_dict({"dedup": {"copy_treshold": 0.9}})
    with pytest.raises(ConfigError, match="near_rule"):
        CurateConfig.from_dict({"dedup": {"near_rule": "xor"}})
    with pytest.raises(ConfigError, match="copy_calib_rate"):
        CurateConfig.from_dict({"dedup": {"copy_calib_rate": 1.5}})
    with pytest.raises(ConfigError, match="copy_threshold"):
        CurateConfig.from_dict({"dedup": {"copy_threshold": 2.0}})
    cfg = CurateConfig.from_dict({"dedup": {"copy_threshold": 0.7, "near_rule": "and"}})
    assert cfg.dedup == DedupConfig(copy_threshold=0.7, near_rule="and")
    assert cfg.to_dict()["dedup"]["copy_threshold"] == 0.7
    from clipforge.cli import build_parser
    from clipforge.curate.cli import config_from_args

    argv = ["curate", "run", "--data", "x", "--output", "o", "--dedup.copy-threshold", "0.6"]
    argv += ["--dedup.near-rule", "descriptor", "--stages", "image,copy,dedup"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.dedup.copy_threshold, cfg.dedup.near_rule) == (0.6, "descriptor")
    assert cfg.stages == ["image", "copy", "dedup"]


def planted_shard(tmp_path, n: int = 40) -> tuple[list, dict[str, str]]:
    """n distinct images plus a crop and a text-overlay copy of the first 6 (keys -> source key)."""
    samples, truth = [], {}
    for k in range(n):
        samples.append({"key": f"img{k:03d}", "jpg": image_bytes(k, size=64), "txt": CAPTIONS[k % 6]})
    for k in range(6):
        img = Image.open(io.BytesIO(image_bytes(k, size=64))).convert("RGB")
        for kind in ("crop", "text"):
            buf = io.BytesIO()
            synthetic_copy(img, kind, key_rng(f"plant{k}", 7)).save(buf, "JPEG", quality=90)
            samples.append({"key": f"img{k:03d}_{kind}", "jpg": buf.getvalue(), "txt": CAPTIONS[0]})
            truth[f"img{k:03d}_{kind}"] = f"img{k:03d}"
    return [write_shard(tmp_path / "part-000000.tar", samples)], truth


def test_copy_stage_calibrates_and_flags_planted_copies(tmp_path, pooled_model):
    shards, truth = planted_shard(tmp_path)
    cfg = CurateConfig.from_dict(
        {"stages": ["image", "copy", "dedup"], "batch_size": 16, "dedup": {"copy_calib_rate": 1.0}}
    )
    out = tmp_path / "out"
    s = run_curation([str(p) for p in shards], out, cfg, model=pooled_model, progress=False)
    st = s["global"]["dedup"]
    assert st["copy_threshold_source"] == "calibrated" and st["copy_calibration"]["copies"] == 52
    import pyarrow.parquet as pq

    t = pq.read_table(out / "scores.parquet").to_pydict()
    row = {k: i for i, k in enumerate(t["key"])}
    caught = [t["copy_dup_of"][row[c]] == src or t["copy_dup_of"][row[src]] == c for c, src in truth.items()]
    assert np.mean(caught) >= 0.9
    planted = set(truth) | set(truth.values())
    flagged = [k for k, m in zip(t["key"], t["copy_max_sim"]) if m is not None]
    assert len([k for k in flagged if k not in planted]) <= 1  # distinct images: at most one false pair
    dropped = [t["dup_of"][row[c]] is not None or t["dup_of"][row[s]] is not None for c, s in truth.items()]
    assert np.mean(dropped) >= 0.9
    assert (out / "shards" / "part-000000.copy.npy").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dedup"]["near_rule"] == "or"
    assert manifest["summary"]["global"]["dedup"]["copy_threshold"] == st["copy_threshold"]


def test_copy_threshold_from_config_and_fallback(tmp_path, pooled_model):
    shards, _ = planted_shard(tmp_path, n=12)
    base = {"stages": ["image", "copy", "dedup"], "batch_size": 16}
    cfg = CurateConfig.from_dict({**base, "dedup": {"copy_threshold": 0.5}})
    s = run_curation([str(p) for p in shards], tmp_path / "a", cfg, model=pooled_model, progress=False)
    assert s["global"]["dedup"]["copy_threshold_source"] == "config"
    assert s["global"]["dedup"]["copy_threshold"] == 0.5
    assert not (np.isfinite(np.load(tmp_path / "a" / "shards" / "part-000000.copyaug.npy"))).any()
    cfg = CurateConfig.from_dict({**base, "dedup": {"copy_calib_rate": 0.0, "copy_fallback": 0.77}})
    s = run_curation([str(p) for p in shards], tmp_path / "b", cfg, model=pooled_model, progress=False)
    assert s["global"]["dedup"]["copy_threshold_source"].startswith("fallback")
    assert s["global"]["dedup"]["copy_threshold"] == 0.77


def test_run_dir_from_before_the_copy_keys_resumes(tmp_path):
    import yaml

    shards, _ = planted_shard(tmp_path, n=6)
    cfg = CurateConfig.from_dict({"stages": ["image"], "batch_size": 8})
    out = tmp_path / "out"
    run_curation([str(p) for p in shards], out, cfg, progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for k in [k for k in saved["dedup"] if k.startswith("copy_") or k == "near_rule"]:
        del saved["dedup"][k]  # as written before the copy keys existed
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    s = run_curation([str(p) for p in shards], out, cfg, progress=False)
    assert s["shards_resumed"] == 1
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    changed = CurateConfig.from_dict({"stages": ["image"], "batch_size": 8, "dedup": {"copy_threshold": 0.5}})
    with pytest.raises(ConfigError, match="copy_threshold"):
        run_curation([str(p) for p in shards], out, changed, progress=False)


def test_copy_stage_with_corrupt_and_blank_images(shards, tmp_path, pooled_model):
    """Undecodable images get NaN descriptors (no synthetic copy); the run and the calibration go on."""
    cfg = CurateConfig.from_dict(
        {"stages": ["image", "copy", "dedup"], "batch_size": 4, "dedup": {"copy_calib_rate": 1.0}}
    )
    out = tmp_path / "out"
    s = run_curation([str(p) for p in shards], out, cfg, model=pooled_model, progress=False)
    assert (
        s["rows"] == 20
        and s["global"]["dedup"]["copy_threshold_source"] == "fallback (19 synthetic copies < copy_calib_min)"
    )
    import pyarrow.parquet as pq

    t = pq.read_table(out / "scores.parquet").to_pydict()
    bad = t["key"].index("s0_004")  # the corrupt image
    assert t["copy_calib_kind"][bad] is None and t["copy_calib_phash"][bad] is None
    desc = np.load(out / "shards" / "part-000000.copy.npy")
    assert np.isnan(desc[4]).all() and not np.isnan(desc[0]).any()
    assert t["dup_of"][1] == "s0_000" or t["dup_of"][0] == "s0_001"  # the exact duplicate still found


def test_eval_set_near_copies_by_descriptor(tmp_path, pooled_model):
    shards, _ = planted_shard(tmp_path)
    img = Image.open(io.BytesIO(image_bytes(10, size=64))).convert("RGB")
    buf = io.BytesIO()
    synthetic_copy(img, "crop", key_rng("eval", 3)).save(buf, "JPEG", quality=90)
    ev = [{"key": "ev_copy_of_10", "jpg": buf.getvalue(), "txt": "x"}]
    ev += [{"key": f"ev{k}", "jpg": image_bytes(100 + k, size=64), "txt": "x"} for k in range(5)]
    (tmp_path / "eval").mkdir()
    eval_shard = write_shard(tmp_path / "eval" / "eval-000000.tar", ev)
    cfg = CurateConfig.from_dict(
        {"stages": ["image", "copy", "dedup"], "batch_size": 16, "dedup": {"copy_calib_rate": 1.0}}
    )
    out = tmp_path / "out"
    s = run_curation(
        [str(p) for p in shards], out, cfg, model=pooled_model, progress=False, eval_data=[str(eval_shard)]
    )
    import pyarrow.parquet as pq

    t = pq.read_table(out / "scores.parquet").to_pydict()
    row = t["key"].index("img010")
    assert t["eval_copy_sim"][row] >= s["global"]["dedup"]["copy_threshold"]
    assert t["eval_dup_of"][row] == "ev_copy_of_10" and s["global"]["dedup"]["eval_copy_dup"] >= 1
    others = [i for i, k in enumerate(t["key"]) if not k.startswith("img010")]
    assert sum(t["eval_dup_of"][i] is not None for i in others) <= 1


def test_run_from_before_the_lowpass_resumes_only_without_it(tmp_path: Path) -> None:
    """A run dir written before ``dedup.copy_lowpass`` existed made descriptors without the low-pass:
    resuming it with the new default would mix two descriptor kinds in one dedup, so it is refused;
    ``copy_lowpass=1`` (how it behaved) resumes it."""
    import yaml

    from clipforge.curate.engine import RUN_CONFIG, open_run_dir

    cfg = CurateConfig.from_dict({"stages": ["image", "copy", "dedup"]})
    old = cfg.to_dict()
    del old["dedup"]["copy_lowpass"]
    (tmp_path / RUN_CONFIG).write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ConfigError, match="copy_lowpass"):
        open_run_dir(tmp_path, cfg)
    legacy = CurateConfig.from_dict({"stages": ["image", "copy", "dedup"], "dedup": {"copy_lowpass": 1.0}})
    open_run_dir(tmp_path, legacy)  # resumes (and records the key)
    with pytest.raises(ConfigError, match=r"copy_lowpass must be in \[1, 16\]"):
        CurateConfig.from_dict({"dedup": {"copy_lowpass": 0.5}}).validate()
