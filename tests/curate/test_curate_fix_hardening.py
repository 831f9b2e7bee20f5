"""``curate fix`` and the mixture cut on hostile inputs: bad caption/score tables, damaged shards, moved
inputs, output dirs over inputs, killed and changed resumes. Score runs are built by hand (no stages)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from curate_testutils import CAPTIONS, image_bytes, write_shard

import clipforge.curate.fix as fixmod
from clipforge.curate.fix import fix_run, load_captions, replace_caption
from clipforge.curate.threshold import auto_threshold, fit_mixture, table_auto_threshold
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport

FIX = "clip_score < 0.2"


def make_run(root, shards=None, scores=None):
    """A scored run: ``shards`` (name -> sample rows) written under ``root``, scores.parquet with one
    row per sample (k*_00..05 near 0.05, the rest near 0.30) and manifest.json listing the shards."""
    if shards is None:
        shards = {
            f"part-{s:06d}.tar": [
                {"key": f"k{s}_{i:02d}", "jpg": image_bytes(i, size=8), "txt": CAPTIONS[i % len(CAPTIONS)]}
                for i in range(20)
            ]
            for s in range(2)
        }
    urls, rows = [], []
    for name, samples in shards.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        urls.append(str(write_shard(root / name, samples)))
        rows += [(s["key"], (root / name).name, s.get("txt")) for s in samples]
    rng = np.random.default_rng(0)
    if scores is None:
        scores = [rng.normal(0.05 if int(k.split("_")[-1]) < 6 else 0.30, 0.02) for k, _, _ in rows]
    d = root / "scores"
    d.mkdir()
    cols = {"key": [r[0] for r in rows], "shard": [r[1] for r in rows], "caption": [r[2] for r in rows]}
    pq.write_table(pa.table({**cols, "clip_score": pa.array(scores, pa.float64())}), d / "scores.parquet")
    (d / "manifest.json").write_text(json.dumps({"urls": urls}))
    return d, urls, cols["key"]


def side(path, keys, **cols):
    """A caption side table: a synthetic caption per key that its scorer prefers (override by cols)."""
    n = len(keys)
    base = {"caption_synthetic": [f"syn {k}" for k in keys], "clip_score_synthetic": [0.5] * n}
    pq.write_table(pa.table({"key": keys, **base, "clip_score_original": [0.1] * n, **cols}), path)
    return str(path)


def noisy(keys):
    return [k for k in keys if int(k.split("_")[-1]) < 6]


def actions(out):
    return {r["key"]: r for r in pq.read_table(out / "actions.parquet").to_pylist()}


def written(summary):
    return [s["__key__"] for u in summary["shards"] for s in iter_tar_samples(u)]


def test_caption_rows_with_failed_scores_bad_types_or_misaligned_candidates(tmp_path):
    # duplicate key: a NaN score (the scorer failed) must not beat a real one, nor win alone
    t = tmp_path / "dup.parquet"
    side(t, ["a", "a", "b", "c"], clip_score_synthetic=[np.nan, 0.4, np.inf, 0.3])
    rep = BadSampleReport()
    cap = load_captions([t], report=rep)
    assert cap["a"]["caption"] == "syn a" and cap["a"]["score"] == 0.4
    assert "b" not in cap and rep.counts["non_finite_score"] == 2
    # a string score column is a clear error naming it, not a TypeError mid-decision
    side(tmp_path / "s.parquet", ["a"], clip_score_synthetic=["0.9"])
    with pytest.raises(ValueError, match="clip_score_synthetic must hold numbers"):
        load_captions([tmp_path / "s.parquet"])
    # candidates and cosines of different lengths: which cosine is whose is unknown -> not paired
    pq.write_table(
        pa.table({"key": ["a", "b"], "caption_synthetic": ["syn a", "syn b"], "clip_cosine_synthetic": [0.3, 0.3],
                  "caption_candidates": [["x", "y", "z"], ["p", None, " "]],
                  "clip_cosine_candidates": [[0.1, 0.9], [np.nan, 0.9, 0.9]]}),
        tmp_path / "c.parquet",
    )  # fmt: skip
    rep = BadSampleReport()
    cap = load_captions([tmp_path / "c.parquet"], by="cosine", report=rep)
    assert (cap["a"]["caption"], cap["a"]["score"]) == ("syn a", 0.3)
    assert (cap["b"]["caption"], cap["b"]["score"]) == ("syn b", 0.3)  # NaN/null/blank candidates never win
    assert rep.counts["candidate_lengths_differ"] == 1


def test_nan_synthetic_scores_are_not_recaptioned_and_skips_are_reported(tmp_path):
    d, _, keys = make_run(tmp_path)
    bad = noisy(keys)
    t = side(tmp_path / "t.parquet", [*bad, "not-a-key", "  "], caption_synthetic=[*(["x"] * len(bad)), "y", " "],
             clip_score_synthetic=[*([np.nan] * len(bad)), 0.5, 0.5])  # fmt: skip
    s = fix_run(d, [t], tmp_path / "o", fix=FIX, progress=False)
    assert s["actions"] == {"kept": 28, "recaptioned": 0, "dropped": 12}
    assert s["caption_rows_skipped"] == {"non_finite_score": 12, "blank_caption": 1}
    assert s["synthetic_captions_unmatched"] == 1
    assert all(r["clip_score_new"] is None for r in actions(tmp_path / "o").values())


def test_auto_cut_is_the_cut_of_the_column_compared_with_auto(tmp_path):
    d, _, keys = make_run(tmp_path)
    t = pq.read_table(d / "scores.parquet")
    t = t.append_column("aaa", pa.array([1.0] * t.num_rows)).append_column(
        "autoflag", pa.array(["n"] * t.num_rows)
    )
    pq.write_table(t, d / "scores.parquet")
    syn = side(tmp_path / "t.parquet", keys, clip_cosine_synthetic=[0.5] * len(keys))
    s = fix_run(d, [syn], tmp_path / "o", fix="clip_score < auto or aaa < 0", progress=False)
    cut = table_auto_threshold(t, "clip_score")["cuts"][0]
    assert s["actions"]["recaptioned"] == 12
    assert actions(tmp_path / "o")["k0_00"]["reason"].endswith(f"cut {cut:.4f})")  # not aaa's cut (1.0)
    # 'auto' inside a column name is no auto cut (no mixture fit of a string column)
    s = fix_run(d, [syn], tmp_path / "o2", fix="autoflag == 'y'", progress=False)
    assert s["actions"]["kept"] == 40
    with pytest.raises(ValueError, match="clip_score < auto"):
        fix_run(d, [syn], tmp_path / "o3", fix="aaa < auto", policy="compete", progress=False)


def test_rows_without_a_finite_score_are_kept_and_said_unjudged(tmp_path):
    scores = [0.05] * 6 + [np.nan, np.inf, -np.inf] + list(np.linspace(0.28, 0.32, 31))
    d, _, keys = make_run(tmp_path, scores=scores)
    s = fix_run(d, [side(tmp_path / "t.parquet", keys)], tmp_path / "o", progress=False)
    act = actions(tmp_path / "o")
    assert s["actions"]["recaptioned"] == 6 and s["kept_unjudged"] == 3
    for k in ("k0_06", "k0_07", "k0_08"):
        assert (
            act[k]["action"] == "kept"
            and act[k]["reason"] == "no finite clip_score: not judged by the auto cut"
        )


def test_damaged_shards_are_counted_by_key_and_weights_list_only_written_pairs(tmp_path):
    def rows(s):
        return [{"key": f"k{s}_{i:02d}", "jpg": image_bytes(i, size=8), "txt": "a dog"} for i in range(20)]

    a, b = rows(0), rows(1)
    a.append(dict(a[10]))  # k0_10 again, after other keys: one sample is written, the repeat reported
    d, urls, keys = make_run(tmp_path, {"part-000000.tar": a, "part-000001.tar": b})
    t = pq.read_table(d / "scores.parquet")
    t = pa.concat_tables([t.slice(0, 20), t.slice(21)])  # one score row per key
    pq.write_table(t, d / "scores.parquet")
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])  # truncated: its second half is lost
    s = fix_run(d, [side(tmp_path / "t.parquet", noisy(keys))], tmp_path / "o", fix=FIX, progress=False)
    got = written(s)
    assert len(got) == len(set(got)) and got.count("k0_10") == 1
    bad = s["bad_samples"]
    assert bad["duplicate_key"] == 1 and bad["truncated_shard"] == 1
    lost = s["bad_sample_keys"]["missing_from_shards"]
    assert bad["missing_from_shards"] == len(lost) > 0 and all(
        k.startswith("part-000001.tar:k1_") for k in lost
    )
    w = pq.read_table(tmp_path / "o" / "weights.parquet").column("key").to_pylist()
    assert sorted(w) == sorted(got)  # no weight row for a pair that no shard holds
    # a sample the score table has no row for is reported, not silently left out
    pq.write_table(t.filter(pc.not_equal(t["key"], "k0_03")), d / "scores.parquet")
    s = fix_run(d, [side(tmp_path / "t.parquet", noisy(keys))], tmp_path / "o2", fix=FIX, progress=False)
    assert "part-000000.tar:k0_03" in s["bad_sample_keys"]["not_in_scores"]


def test_null_keys_and_shards_in_the_score_table_are_reported_not_fatal(tmp_path):
    d, _, keys = make_run(tmp_path)
    t = pq.read_table(d / "scores.parquet")
    k, sh = t["key"].to_pylist(), t["shard"].to_pylist()
    k[3], sh[5] = None, None  # k0_03's row has no key; k0_05's row no shard (matched by key alone)
    pq.write_table(
        t.set_column(0, "key", pa.array(k)).set_column(1, "shard", pa.array(sh)), d / "scores.parquet"
    )
    s = fix_run(d, [side(tmp_path / "t.parquet", noisy(keys))], tmp_path / "o", fix=FIX, progress=False)
    assert s["bad_sample_keys"] == {"not_in_scores": ["part-000000.tar:k0_03"]}
    assert "k0_05" in written(s) and len(written(s)) == 39


def test_moved_or_clashing_inputs_and_outputs_over_inputs_fail_before_output_is_touched(tmp_path):
    d, urls, keys = make_run(tmp_path)
    cap_dir = tmp_path / "cap"
    (cap_dir / "captions").mkdir(parents=True)
    side(cap_dir / "captions" / "c.parquet", noisy(keys))
    # --output the caption run's own table dir: --overwrite would delete the tables it is about to read
    from clipforge.utils import OutputExistsError

    with pytest.raises(OutputExistsError, match="holds an input"):
        fix_run(d, [cap_dir], cap_dir / "captions", fix=FIX, overwrite=True, progress=False)
    assert (cap_dir / "captions" / "c.parquet").is_file()
    # a bad caption table with --overwrite: refused before the earlier result is deleted
    out = tmp_path / "o"
    fix_run(d, [cap_dir], out, fix=FIX, progress=False)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        fix_run(d, [tmp_path / "bad.parquet"], out, fix=FIX, overwrite=True, progress=False)
    assert (out / "actions.parquet").is_file()
    # shards moved away: a clear error, nothing written
    (tmp_path / "part-000001.tar").rename(tmp_path / "moved.tar")
    with pytest.raises(FileNotFoundError, match="1 of 2 input shards"):
        fix_run(d, [cap_dir], tmp_path / "o2", fix=FIX, progress=False)
    assert not (tmp_path / "o2").exists()
    # two inputs with one file name would share a fixed shard (the second silently 'resumed')
    (tmp_path / "moved.tar").rename(tmp_path / "part-000001.tar")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "part-000000.tar").write_bytes((tmp_path / "part-000001.tar").read_bytes())
    (d / "manifest.json").write_text(json.dumps({"urls": [*urls, str(tmp_path / "x" / "part-000000.tar")]}))
    with pytest.raises(ValueError, match="share a file name"):
        fix_run(d, [cap_dir], tmp_path / "o3", fix=FIX, progress=False)


def test_resume_after_a_kill_or_with_changed_inputs_writes_every_key_once_and_current(tmp_path, monkeypatch):
    d, _, keys = make_run(tmp_path)
    t = side(tmp_path / "t.parquet", noisy(keys))
    out = tmp_path / "o"
    real, calls = fixmod.write_fixed_shard, []

    def killed(url, *a, **kw):
        calls.append(url)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between shards
        return real(url, *a, **kw)

    monkeypatch.setattr(fixmod, "write_fixed_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        fix_run(d, [t], out, fix=FIX, progress=False)
    monkeypatch.setattr(fixmod, "write_fixed_shard", real)
    s = fix_run(d, [t], out, fix=FIX, progress=False)
    assert s["shards_resumed"] == 1 and sorted(written(s)) == sorted(keys)
    # same settings, new caption table content: shards follow the new decisions (no stale shard)
    side(tmp_path / "t.parquet", noisy(keys), caption_synthetic=[f"new {k}" for k in noisy(keys)])
    s = fix_run(d, [t], out, fix=FIX, progress=False)
    got = {x["__key__"]: x["txt"].decode() for u in s["shards"] for x in iter_tar_samples(u)}
    assert all(got[k] == f"new {k}" for k in noisy(keys))
    # a damaged done-record or a deleted fixed shard is redone, not trusted
    (out / "shards" / "fixed-part-000000.json").write_text("{")
    (out / "shards" / "fixed-part-000001.tar").unlink()
    s = fix_run(d, [t], out, fix=FIX, progress=False)
    assert s["shards_resumed"] == 0 and sorted(written(s)) == sorted(keys)
    (out / "fix_config.json").write_text("[]")
    with pytest.raises(ValueError, match="fix_config.json is unreadable"):
        fix_run(d, [t], out, fix=FIX, progress=False)


def test_replace_caption_keeps_unparsable_json_and_survives_deep_nesting():
    s = replace_caption({"__key__": "a", "txt": b"old", "json": b"{not json"}, "new")
    assert json.loads(s["json"]) == {
        "json_original": "{not json",
        "caption_original": "old",
        "captions": ["new"],
    }
    deep = replace_caption({"__key__": "a", "txt": b"old", "json": b"[" * 100_000}, "new")
    assert json.loads(deep["json"])["captions"] == ["new"]


def test_mixture_degrades_sanely_on_one_value_odd_captions_and_tiny_buckets():
    one = fit_mixture(np.full(50, 0.3))
    assert one["cut"] == 0.3 and one["noise_rate"] == 0.0 and not one["bimodal"]
    res = auto_threshold(np.r_[np.full(40, 0.3), np.full(10, 0.05)], [1, None, "a b"] * 16 + ["x", "y"])
    assert res["n"] == 50  # non-text captions count 0 words instead of crashing
    caps = [" ".join(["w"] * (i % 19 + 1)) for i in range(95)]
    res = auto_threshold(np.random.default_rng(0).random(95), caps, n_buckets=10, min_bucket=5)
    assert any(b["fit"].startswith("pooled") for b in res["buckets"])  # a 5-row bucket pools


@pytest.mark.filterwarnings("ignore")  # numpy/sklearn overflow warnings on the way to the error
def test_mixture_on_overflowing_scores_is_a_clear_error():
    with pytest.raises(ValueError, match="mixture fit failed on 40 scores"):
        fit_mixture(np.array([1e300, -1e300] * 20))
