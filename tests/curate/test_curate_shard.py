"""One shard -> its score table: field errors and unusable old tables are counted by key, never silent."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
from curate_testutils import image_bytes, make_shards, write_shard

from clipforge.curate.config import CurateConfig
from clipforge.curate.engine import run_curation
from clipforge.curate.shard import shard_paths


def run(shards, out):
    cfg = CurateConfig(stages=["text", "image"], batch_size=4)
    return run_curation([str(s) for s in shards], out, cfg, progress=False)


def raw_shard(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def test_bad_json_is_reported_by_key_and_caption_rule_is_data_fields(tmp_path):
    img = image_bytes(0)
    shard = raw_shard(
        tmp_path / "a.tar",
        [
            ("good.jpg", img), ("good.txt", b"a dog"), ("good.json", b'{"id": 1}'),
            ("badjson.jpg", img), ("badjson.txt", b"a cat"), ("badjson.json", b"{not json"),
            ("nocap.jpg", img), ("nocap.json", b"[1, 2]"),
            ("metacap.jpg", img), ("metacap.json", json.dumps({"caption": "from json"}).encode()),
        ],
    )  # fmt: skip
    s = run([shard], tmp_path / "out")
    assert s["bad_samples"] == {"bad_json": 2, "missing_caption": 1}
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()}
    assert len(rows) == 4  # every key keeps its row
    assert rows["badjson"]["caption"] == "a cat"  # KEY.txt still wins over a broken KEY.json
    assert rows["nocap"]["caption"] is None and rows["nocap"]["caption_error"] == "missing_caption"
    assert rows["metacap"]["caption"] == "from json"
    keys = json.loads((tmp_path / "out" / "manifest.json").read_text())["bad_samples"]["keys"]
    assert sorted(k.split(":")[0] for k in keys["bad_json"]) == ["badjson", "nocap"]


def test_unreadable_score_table_is_rescored_and_reported(tmp_path):
    shards = make_shards(tmp_path)
    out = tmp_path / "out"
    run(shards, out)
    table = shard_paths(out, str(shards[0]))["table"]
    table.write_bytes(b"PAR1 this is not parquet")
    s = run(shards, out)
    assert (s["shards_scored"], s["shards_resumed"]) == (1, 1)
    assert s["bad_samples"] == {"unreadable_score_table": 1}
    assert pq.read_table(table).num_rows == 10


def test_same_named_shard_from_elsewhere_is_not_resumed(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shard(tmp_path / "a" / "part.tar", [{"key": "from_a", "jpg": image_bytes(1), "txt": "x"}])
    b = write_shard(tmp_path / "b" / "part.tar", [{"key": "from_b", "jpg": image_bytes(2), "txt": "y"}])
    run([a], tmp_path / "out")
    s = run([b], tmp_path / "out")  # same stem, other shard: old scores must not be reused
    keys = pq.read_table(tmp_path / "out" / "scores.parquet").column("key").to_pylist()
    assert keys == ["from_b"] and s["bad_samples"] == {"stale_score_table": 1}
    monkeypatch.chdir(tmp_path)
    assert run(["b/part.tar"], tmp_path / "out")["shards_resumed"] == 1  # a relative path: same shard


def test_rewritten_shard_is_rescored_not_a_crash(tmp_path, monkeypatch):
    import clipforge.curate.shard as shard_mod

    shard = write_shard(
        tmp_path / "p.tar", [{"key": f"old{i}", "jpg": image_bytes(i), "txt": "x"} for i in range(3)]
    )
    out = tmp_path / "out"
    run([shard], out)
    write_shard(shard, [{"key": f"new{i}", "jpg": image_bytes(i), "txt": "y"} for i in range(4)])  # same path
    s = run([shard], out)  # every stage done, but the shard changed (size/mtime): scored again
    assert s["bad_samples"] == {"stale_score_table": 1} and s["shards_scored"] == 1
    assert pq.read_table(out / "scores.parquet").column("key").to_pylist() == [f"new{i}" for i in range(4)]
    # no size/mtime to compare (a remote shard): a partial resume finds the keys changed and rescores
    monkeypatch.setattr(shard_mod, "source_stat", lambda url: None)
    cfg = CurateConfig(stages=["text"], batch_size=4)
    run_curation([str(shard)], tmp_path / "out2", cfg, progress=False)
    write_shard(shard, [{"key": f"v3_{i}", "jpg": image_bytes(i), "txt": "z"} for i in range(2)])
    s = run_curation([str(shard)], tmp_path / "out2", CurateConfig(stages=["text", "image"]), progress=False)
    assert s["bad_samples"] == {"stale_score_table": 1} and s["rows"] == 2
    t = pq.read_table(tmp_path / "out2" / "scores.parquet")
    assert t.column("key").to_pylist() == ["v3_0", "v3_1"] and t.column("caption").to_pylist() == ["z", "z"]
