"""Keys with non-UTF-8 bytes: ``tarfile`` turns ``b"\\xff"`` in a member name into the surrogate
``"\\udcff"``; such a key used to pass the reader and crash the run later, when a Parquet table was
written (UnicodeEncodeError). It is now an ``unsafe_key`` skip, reported by (escaped) key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_testutils import good_sample, write_tar

from clipforge.data.ingest import IngestConfig, ingest
from clipforge.data.keys import is_utf8, printable, unsafe_key_reason
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.writer import ShardWriter

BAD = "b\udcffc"  # what tarfile makes of the member name b"b\xffc.jpg"


def _shard(tmp_path: Path) -> Path:
    path = write_tar(tmp_path / "s.tar", [good_sample("a"), good_sample(BAD, caption="x"), good_sample("c")])
    assert b"b\xffc.jpg" in path.read_bytes()  # the raw, undecodable bytes are in the shard
    return path


@pytest.mark.parametrize("key", [BAD, "\udcff", "ok/\ud800"])
def test_surrogate_keys_are_unsafe(key: str) -> None:
    assert not is_utf8(key)
    assert "UTF-8" in (unsafe_key_reason(key) or "")


def test_valid_unicode_keys_stay_safe() -> None:
    for key in ("a", "dir/été", "日本/写真", "emoji\U0001f600"):
        assert is_utf8(key) and unsafe_key_reason(key) is None


def test_printable_escapes_surrogates() -> None:
    out = printable(BAD)
    assert out == "b\\udcffc" and is_utf8(out)


def test_reader_skips_non_utf8_key_by_key(tmp_path: Path) -> None:
    report = BadSampleReport()
    keys = [s["__key__"] for s in iter_tar_samples(str(_shard(tmp_path)), report)]
    assert keys == ["a", "c"] and dict(report.counts) == {"unsafe_key": 1}
    (entry,) = report.keys["unsafe_key"]
    assert entry.startswith("s.tar:b\\udcffc:") and "UTF-8" in entry
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # reports stay writable as UTF-8


def test_every_kept_key_can_go_into_parquet(tmp_path: Path) -> None:
    import pyarrow as pa

    keys = [s["__key__"] for s in iter_tar_samples(str(_shard(tmp_path)))]
    assert pa.table({"key": keys}).num_rows == 2  # raised UnicodeEncodeError on the surrogate key


def test_writer_refuses_non_utf8_key(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "o-%03d.tar") as w, pytest.raises(ValueError, match="unsafe key"):
        w.write({"__key__": BAD, "txt": b"x"})


def test_ingest_reshard_counts_non_utf8_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stats = ingest(
        [str(_shard(tmp_path))], IngestConfig(output=out, workers=1), kind="shards", progress=False
    )
    assert stats["written"] == 2 and stats["skipped_by_reason"] == {"unsafe_key": 1}
    kept = [s["__key__"] for p in sorted(out.glob("*.tar")) for s in iter_tar_samples(str(p))]
    assert sorted(kept) == ["a", "c"]
