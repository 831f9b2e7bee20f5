from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipforge.curate.engine import run_curation, shard_paths
from clipforge.curate.reshard import filter_run
from clipforge.curate.stages import CurateConfig

ALL = ["clip-score", "text", "image", "safety", "dedup", "balance"]


def run(shards, out, model, stages=ALL, **kw):
    return run_curation(
        [str(s) for s in shards],
        out,
        CurateConfig(stages=stages, batch_size=4),
        model=model,
        progress=False,
        **kw,
    )


def test_all_stages_one_row_per_key(shards, tmp_path, tiny_model):
    s = run(shards, tmp_path / "out", tiny_model)
    t = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert s["rows"] == t.num_rows == 20
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows["s0_004"]["image_valid"] is False and rows["s0_004"]["clip_score"] is None
    assert rows["s0_003"]["is_blank"] is True
    assert rows["s0_005"]["has_url"] and rows["s0_005"]["has_html"]
    # exact + near duplicates of s0_000 are grouped: exactly one of the three is kept
    group = ["s0_000", "s0_001", "s0_002"]
    assert sum(not rows[k]["is_duplicate"] for k in group) == 1
    assert rows["s0_001"]["exact_dup_of"] in ("s0_000", "s0_001", None)
    # clip_score is the cosine of the saved embeddings
    p = shard_paths(tmp_path / "out", str(shards[0]))
    img, txt = np.load(p["image"]).astype(np.float32), np.load(p["text"]).astype(np.float32)
    t0 = pq.read_table(p["table"])
    sc = np.array([np.nan if v is None else v for v in t0.column("clip_score").to_pylist()])
    assert np.allclose(np.nansum(img * txt, axis=1)[~np.isnan(sc)], sc[~np.isnan(sc)], atol=2e-3)
    assert np.isnan(img[4]).all()
    assert all(0 <= rows[k]["unsafe_score"] <= 1 for k in rows if rows[k]["image_valid"])
    assert s["bad_samples"] == {}  # a corrupt image is a scored row (image_valid=False), not a skip


def test_resume_scores_only_what_is_missing(shards, tmp_path, tiny_model):
    out = tmp_path / "out"
    run(shards, out, tiny_model, stages=["text", "image"])
    p0, p1 = (shard_paths(out, str(s))["table"] for s in shards)
    mtime1 = p1.stat().st_mtime_ns
    p0.unlink()  # as if the run was killed before shard 0 finished
    s = run(shards, out, tiny_model, stages=["text", "image"])
    assert (s["shards_scored"], s["shards_resumed"]) == (1, 1) and p1.stat().st_mtime_ns == mtime1
    before = pq.read_table(p1).column("phash").to_pylist()
    s = run(shards, out, tiny_model, stages=["text", "image", "clip-score"])  # add a stage: only it runs
    assert s["shards_scored"] == 2
    t1 = pq.read_table(p1)
    assert t1.column("phash").to_pylist() == before and "clip_score" in t1.column_names
    assert json.loads(pq.read_schema(p1).metadata[b"clipforge.curate"])["stages"] == [
        "text",
        "image",
        "clip-score",
    ]


def test_filter_reshards_kept_samples_byte_identical(shards, tmp_path, tiny_model):
    out = tmp_path / "out"
    run(shards, out, tiny_model, stages=["text", "image", "dedup"])
    s = filter_run(
        out, ["image_valid and not is_blank", "not is_duplicate"], tmp_path / "cur", progress=False
    )
    keep = (tmp_path / "cur" / "keep.txt").read_text().split()
    assert s["kept"] == len(keep) == s["written"] == 20 - 1 - 1 - 2  # corrupt, blank, 2 of the dup group
    assert "s0_004" not in keep and "s0_003" not in keep
    with tarfile.open(s["shards"][0]) as tf:
        names = tf.getnames()
        data = tf.extractfile("s1_000.jpg").read()
    assert f"{keep[0]}.json" in names
    with tarfile.open(shards[1]) as tf:
        assert tf.extractfile("s1_000.jpg").read() == data


def test_duplicate_keys_across_shards_is_a_clear_error(tmp_path, tiny_model):
    from curate_testutils import image_bytes, write_shard

    a = write_shard(tmp_path / "a.tar", [{"key": "same", "jpg": image_bytes(0), "txt": "x"}])
    b = write_shard(tmp_path / "b.tar", [{"key": "same", "jpg": image_bytes(1), "txt": "y"}])
    with pytest.raises(ValueError, match="unique"):
        run([a, b], tmp_path / "out", tiny_model, stages=["text"])


def test_eval_set_dedup(shards, tmp_path, tiny_model):
    from curate_testutils import write_shard

    with tarfile.open(shards[1]) as tf:
        leaked = tf.extractfile("s1_007.jpg").read()
    ev = write_shard(tmp_path / "eval.tar", [{"key": "e0", "jpg": leaked, "txt": "eval"}])
    run(shards, tmp_path / "out", tiny_model, stages=["image", "clip-score", "dedup"], eval_data=[str(ev)])
    t = pq.read_table(tmp_path / "out" / "scores.parquet")
    flagged = [k for k, e in zip(t.column("key").to_pylist(), t.column("eval_dup_of").to_pylist()) if e]
    assert "s1_007" in flagged and len(flagged) <= 2


def test_cli_json_and_report(shards, tmp_path, capsys):
    from clipforge.cli import main

    out = tmp_path / "out"
    rc = main(
        [
            "curate",
            "run",
            "--data",
            *map(str, shards),
            "--output",
            str(out),
            "--stages",
            "text,image,dedup",
            "--json",
        ]
    )
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["rows"] == 20
    rc = main(
        [
            "curate",
            "report",
            "--scores",
            str(out),
            "--where",
            "caption_words >= 7",
            "--sheet-column",
            "caption_words",
            "--examples",
            "2",
            "--json",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and (out / "report" / "hist" / "caption_words.png").exists()
    words = pq.read_table(out / "scores.parquet").column("caption_words").to_pylist()
    assert r["filters"][0]["kept"] == sum(w >= 7 for w in words) > 0
    assert (out / "report" / "lowest_caption_words.png").stat().st_size > 1000
    rc = main(
        [
            "curate",
            "filter",
            "--scores",
            str(out),
            "--where",
            "clip_score > 1",
            "--output",
            str(tmp_path / "f"),
            "--json",
        ]
    )
    assert rc == 2 and "no column 'clip_score'" in json.loads(capsys.readouterr().out)["error"]


def test_real_flickr_shard_text_image_dedup(flickr_test_shard, tmp_path):
    s = run_curation(
        [str(flickr_test_shard)],
        tmp_path / "out",
        CurateConfig(stages=["text", "image", "dedup"]),
        progress=False,
    )
    t = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert s["rows"] == t.num_rows == 1000
    assert t.column("image_valid").to_pylist() == [True] * 1000
    langs = t.column("lang").to_pylist()
    assert langs.count("en") >= 950  # flickr8k captions are English
    assert sum(t.column("is_blank").to_pylist()) <= 5
    assert set(t.column("width").to_pylist()) == {224}
