"""ShardWriter: count/size limits, atomic finalize, side tables and extending them by key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest
from data_testutils import image_bytes

from clipforge.data.reader import iter_tar_samples
from clipforge.data.writer import ShardWriter, add_columns, read_side_table


def _sample(i: int) -> dict:
    return {
        "__key__": f"{i:06d}",
        "__source__": f"src/{i}.jpg",
        "jpg": image_bytes(40 + i, 30, seed=i),
        "txt": f"caption {i}",
        "json": {"i": i},
        "cls": i % 3,
    }


def test_maxcount_rollover_and_roundtrip(tmp_path: Path) -> None:
    with ShardWriter(output_dir=tmp_path, prefix="part", maxcount=4) as w:
        for i in range(10):
            w.write(_sample(i))
    assert [Path(p).name for p in w.shards] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert not list(tmp_path.glob(".*tmp")), "temp files must be renamed or removed"
    got = [s for p in w.shards for s in iter_tar_samples(p)]
    assert [s["__key__"] for s in got] == [f"{i:06d}" for i in range(10)]
    assert got[7]["txt"] == b"caption 7" and json.loads(got[7]["json"]) == {"i": 7} and got[7]["cls"] == b"1"
    assert got[7]["jpg"] == _sample(7)["jpg"]


def test_maxsize_rollover(tmp_path: Path) -> None:
    # the writer counts payload + 1 KiB per member (tar header/padding): 2 samples fit in 2.5 x one
    one = (5000 + 1024) + (3 + 1024)
    with ShardWriter(str(tmp_path / "s-%04d.tar"), maxsize=2.5 * one) as w:
        for i in range(6):
            w.write({"__key__": f"k{i}", "jpg": bytes([i]) * 5000, "txt": f"c{i:02d}"})
    assert len(w.shards) == 3 and w.total == 6
    assert all(sum(1 for _ in iter_tar_samples(p)) == 2 for p in w.shards)
    assert read_side_table(tmp_path).column("width").null_count == 6  # not an image: size unknown


def test_side_table_columns_and_add_columns(tmp_path: Path) -> None:
    with ShardWriter(output_dir=tmp_path, maxcount=3) as w:
        for i in range(7):
            w.write(_sample(i))
    t = read_side_table(tmp_path)
    assert t.column_names[:7] == ["key", "shard", "caption", "width", "height", "sha256", "source"]
    rows = t.to_pylist()
    assert [r["key"] for r in rows] == [f"{i:06d}" for i in range(7)]
    assert rows[5]["shard"] == "shard-000001.tar" and rows[5]["width"] == 45 and rows[5]["height"] == 30
    assert rows[5]["sha256"] == hashlib.sha256(_sample(5)["jpg"]).hexdigest()
    assert rows[5]["caption"] == "caption 5" and rows[5]["source"] == "src/5.jpg"

    n = add_columns(tmp_path, pa.table({"key": ["000006", "000001"], "score": [0.6, 0.1]}))
    assert n == 2
    t = read_side_table(tmp_path)
    scores = dict(zip(t.column("key").to_pylist(), t.column("score").to_pylist()))
    assert scores == {f"{i:06d}": {1: 0.1, 6: 0.6}.get(i) for i in range(7)}
    with pytest.raises(ValueError, match="already exists"):
        add_columns(tmp_path, {"key": ["000001"], "score": [1.0]})
    with pytest.raises(KeyError, match="1 of 1 keys"):
        add_columns(tmp_path, {"key": ["nope"], "other": [1]})
    assert add_columns(tmp_path, {"key": ["000001"], "score": [1.0]}, overwrite=True) == 1
    assert read_side_table(tmp_path, ["key", "score"]).to_pylist()[1] == {"key": "000001", "score": 1.0}


def test_bad_keys_and_abort(tmp_path: Path) -> None:
    w = ShardWriter(output_dir=tmp_path, maxcount=2)
    w.write(_sample(0))
    with pytest.raises(ValueError, match="duplicate"):
        w.write(_sample(0))
    with pytest.raises(ValueError, match="without dots"):
        w.write({"__key__": "a.b", "txt": "x"})
    w.write(_sample(1))
    w.write(_sample(2))  # starts shard 1, never finalized
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.parquet", "shard-000000.tar"]
    with pytest.raises(ValueError, match="%d"):
        ShardWriter(str(tmp_path / "no-field.tar"))
