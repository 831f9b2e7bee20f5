"""``curate fix`` (issue 13): recaption pairs below the cut instead of dropping them; an action per key."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_testutils import CAPTIONS, image_bytes, write_shard

from clipforge.curate.config import CurateConfig
from clipforge.curate.engine import run_curation
from clipforge.curate.fix import fix_run
from clipforge.data.reader import iter_tar_samples


@pytest.fixture()
def scored(tmp_path):
    """40 pairs in 2 shards (one blank image), scored by text+image stages, with a planted clip_score:
    12 'noisy' pairs (k*_00..05) near 0.05, the rest near 0.30."""
    urls = []
    for s in range(2):
        rows = []
        for i in range(20):
            rows.append(
                {"key": f"k{s}_{i:02d}", "jpg": image_bytes(s * 50 + i), "txt": CAPTIONS[i % len(CAPTIONS)]}
            )
        if s == 1:
            rows[19]["jpg"] = image_bytes(0, color=(120, 120, 120))  # blank: dropped by the keep-rules
        urls.append(str(write_shard(tmp_path / f"part-{s:06d}.tar", rows)))
    out = tmp_path / "scores"
    run_curation(urls, out, CurateConfig(stages=["text", "image"]), progress=False)
    t = pq.read_table(out / "scores.parquet")
    rng = np.random.default_rng(0)
    keys = t.column("key").to_pylist()
    noisy = {k for k in keys if int(k.split("_")[1]) < 6}
    score = [float(rng.normal(0.05, 0.02) if k in noisy else rng.normal(0.30, 0.02)) for k in keys]
    t = t.append_column("clip_score", pa.array(score, pa.float32()))
    pq.write_table(t, out / "scores.parquet")
    return out, urls, sorted(noisy)


def side_table(path, rows):
    cols = {
        c: [r.get(c) for r in rows]
        for c in ("key", "caption_synthetic", "clip_score_synthetic", "clip_score_original")
    }
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_fix_recaptions_below_the_cut_and_records_every_key(scored, tmp_path):
    scores, urls, noisy = scored
    # a synthetic caption for every noisy key but k0_00; k0_01's scores worse than its original
    rows = [
        {
            "key": k,
            "caption_synthetic": f"a fixed caption for {k}",
            "clip_score_synthetic": 0.4,
            "clip_score_original": 0.05,
        }
        for k in noisy
        if k != "k0_00"
    ]
    rows[0]["clip_score_synthetic"] = 0.01  # k0_01
    rows.append({"key": "k0_10", "caption_synthetic": "never used: the pair is above the cut"})
    weak = side_table(tmp_path / "weak.parquet", rows)
    # a second table: a better caption for k0_02 wins by clip score
    strong = side_table(
        tmp_path / "strong.parquet",
        [
            {
                "key": "k0_02",
                "caption_synthetic": "the best caption",
                "clip_score_synthetic": 0.5,
                "clip_score_original": 0.05,
            }
        ],
    )
    out = tmp_path / "fixed"
    s = fix_run(scores, [weak, strong], out, fix="clip_score < 0.2", progress=False)
    assert s["actions"] == {"kept": 27, "recaptioned": 10, "dropped": 3}
    assert s["where"] == [
        "image_valid and not is_blank"
    ]  # no dedup stage ran: its rules are skipped, said so
    assert s["where_skipped_no_column"] == ["not is_duplicate", "not is_eval_duplicate"]
    act = {r["key"]: r for r in pq.read_table(out / "actions.parquet").to_pylist()}
    assert len(act) == 40
    assert s["dropped_by"] == {
        "clip_score < 0.2; no synthetic caption": 1,
        "clip_score < 0.2; synthetic caption scores no better than the original": 1,
        "fails 'image_valid and not is_blank'": 1,
    }
    assert act["k0_00"]["action"] == "dropped" and "no synthetic caption" in act["k0_00"]["reason"]
    assert act["k0_01"]["action"] == "dropped" and "no better" in act["k0_01"]["reason"]
    assert act["k1_19"]["action"] == "dropped" and "is_blank" in act["k1_19"]["reason"]
    assert act["k0_02"]["action"] == "recaptioned" and act["k0_02"]["caption_new"] == "the best caption"
    assert act["k0_10"]["action"] == "kept" and act["k0_10"]["caption_new"] is None
    # fixed shards: one per input, recaptioned KEY.txt + KEY.json captions replaced, originals kept
    assert len(s["shards"]) == 2
    got = {x["__key__"]: x for u in s["shards"] for x in iter_tar_samples(u)}
    src = {x["__key__"]: x for u in urls for x in iter_tar_samples(u)}
    assert set(got) == {k for k, r in act.items() if r["action"] != "dropped"}
    fixed = got["k0_02"]
    meta = json.loads(fixed["json"])
    assert fixed["txt"].decode() == "the best caption" and meta["captions"] == ["the best caption"]
    assert meta["caption_original"] == src["k0_02"]["txt"].decode() and meta["id"] == "k0_02"
    assert fixed["jpg"] == src["k0_02"]["jpg"]
    assert got["k0_10"]["txt"] == src["k0_10"]["txt"] and got["k0_10"]["json"] == src["k0_10"]["json"]

    # resume: same settings skip the finished shards; other settings are refused; --overwrite replaces
    again = fix_run(scores, [weak, strong], out, fix="clip_score < 0.2", progress=False)
    assert again["shards_resumed"] == 2 and again["actions"] == s["actions"]
    with pytest.raises(ValueError, match="other settings"):
        fix_run(scores, [weak], out, fix="clip_score < 0.2", progress=False)
    auto = fix_run(scores, [weak, strong], out, overwrite=True, progress=False)  # the mixture cut
    assert auto["fix"] == "clip_score < auto" and auto["actions"]["recaptioned"] == 10


def test_fix_cli_json_and_clear_errors(scored, tmp_path, capsys):
    from clipforge.cli import main

    scores, _, noisy = scored
    table = side_table(tmp_path / "t.parquet", [{"key": k, "caption_synthetic": "a dog"} for k in noisy])
    argv = ["curate", "fix", "--scores", str(scores), "--captions", table, "--output", str(tmp_path / "o")]
    assert main([*argv, "--fix", "clip_score < 0.2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["actions"]["recaptioned"] == 12 and s["rows"] == 40
    assert main([*argv, "--fix", "clip_score < 0.2", "--recaption-weight", "0.5", "--overwrite"]) == 0
    assert "--weight-column pair_weight" in capsys.readouterr().out  # the table says how to train with it
    assert main([*argv, "--fix", "nope < 1", "--overwrite"]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["x"]}), bad)
    assert (
        main(
            [
                "curate",
                "fix",
                "--scores",
                str(scores),
                "--captions",
                str(bad),
                "--output",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "caption side table" in capsys.readouterr().err


def test_compete_policy_keeps_only_synthetic_captions_that_clear_the_cut(scored, tmp_path):
    """``--policy compete``: raw and synthetic candidates on the cut's scale (plain cosine); a synthetic
    caption the scorer would itself have cut is no fix (dropped), the best candidate by cosine wins."""
    scores, urls, noisy = scored
    syn = {"k0_00": 0.35, "k0_01": 0.10, "k0_02": 0.0, "k0_04": 0.3, "k0_05": 0.3}
    syn.update({k: 0.3 for k in noisy if k.startswith("k1_")})
    rows = [
        {"key": k, "caption_synthetic": f"syn {k}", "clip_score_synthetic": 0.9, "clip_score_original": 0.1,
         "clip_cosine_synthetic": c, "caption_candidates": [f"syn {k}", f"alt {k}"],
         "clip_cosine_candidates": [c, c - 0.05]}
        for k, c in syn.items()
    ]  # fmt: skip
    rows[0]["clip_cosine_candidates"] = [0.2, 0.35]  # k0_00: the 2nd candidate is the best by cosine
    rows[0]["clip_cosine_synthetic"] = 0.2
    cols = {c: [r[c] for r in rows] for c in rows[0]}
    pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    t = str(tmp_path / "t.parquet")
    s = fix_run(scores, [t], tmp_path / "c", policy="compete", progress=False)
    act = {r["key"]: r for r in pq.read_table(tmp_path / "c" / "actions.parquet").to_pylist()}
    assert s["policy"] == "compete"
    assert act["k0_00"]["action"] == "recaptioned" and act["k0_00"]["caption_new"] == "alt k0_00"
    assert act["k0_00"]["clip_score_new"] == pytest.approx(0.35)
    for k in ("k0_01", "k0_02"):  # a synthetic below the cut, or below the raw one: neither clears it
        assert act[k]["action"] == "dropped" and "neither raw nor synthetic" in act[k]["reason"]
    assert act["k0_03"]["action"] == "dropped" and "no synthetic caption" in act["k0_03"]["reason"]
    assert act["k0_04"]["action"] == "recaptioned" and act["k0_10"]["action"] == "kept"
    assert s["actions"]["recaptioned"] == 9  # k0_00, k0_04, k0_05 and k1_00..05
    # the default policy on the same table replaces whatever its CLIPScore prefers (k0_01, k0_02 too)
    r = fix_run(scores, [t], tmp_path / "r", progress=False)
    assert r["actions"]["recaptioned"] == 11 and r["policy"] == "replace"
    # compete needs the cosines and an auto cut
    old = side_table(tmp_path / "old.parquet", [{"key": "k0_00", "caption_synthetic": "x"}])
    with pytest.raises(ValueError, match="clip_cosine_synthetic"):
        fix_run(scores, [old], tmp_path / "o", policy="compete", progress=False)
    with pytest.raises(ValueError, match="auto"):
        fix_run(scores, [t], tmp_path / "o2", fix="clip_score < 0.2", policy="compete", progress=False)


def test_recaption_weight_side_table_gives_every_written_pair_its_weight(scored, tmp_path):
    """OUT/weights.parquet: one row per written pair, named by the fixed shard it is in, weight 1 for a
    kept pair and --recaption-weight for a recaptioned one; the trainer's side-table reader agrees."""
    from clipforge.data.shards import shard_name
    from clipforge.train.textsource import SideTexts, TextSource

    scores, _, noisy = scored
    rows = [
        {"key": k, "caption_synthetic": f"new {k}", "clip_score_synthetic": 0.4, "clip_score_original": 0.05}
        for k in noisy
    ]
    out = tmp_path / "fixed"
    s = fix_run(
        scores, [side_table(tmp_path / "syn.parquet", rows)], out, fix="clip_score < 0.2",
        recaption_weight=0.25, progress=False,
    )  # fmt: skip
    assert s["recaption_weight"] == 0.25 and "--weight-column pair_weight" in s["train_weights"]
    act = {r["key"]: r["action"] for r in pq.read_table(out / "actions.parquet").to_pylist()}
    w = pq.read_table(out / "weights.parquet").to_pylist()
    written = {(shard_name(u), x["__key__"]) for u in s["shards"] for x in iter_tar_samples(u)}
    assert {(r["shard"], r["key"]) for r in w} == written  # every written pair, no dropped one
    for r in w:
        assert r["pair_weight"] == pytest.approx(0.25 if act[r["key"]] == "recaptioned" else 1.0)
    assert sum(r["pair_weight"] < 1 for r in w) == s["actions"]["recaptioned"] == len(noisy)
    side = SideTexts.load([str(out / "weights.parquet")], TextSource("raw"), "x", "y", "pair_weight")
    for shard, key in written:
        assert side.get(key, shard)["weight"] == pytest.approx(0.25 if act[key] == "recaptioned" else 1.0)
    # the weight is a setting: a resume with another one is refused, a bad one is a clear error
    with pytest.raises(ValueError, match="other settings"):
        fix_run(scores, [str(tmp_path / "syn.parquet")], out, fix="clip_score < 0.2", progress=False)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="recaption-weight"):
            fix_run(
                scores, [str(tmp_path / "syn.parquet")], tmp_path / "x", recaption_weight=bad, progress=False
            )
