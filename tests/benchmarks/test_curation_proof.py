"""The issue-13 proof's ceiling rows and seed summary (benchmarks/curation_proof.py helpers)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import curation_proof  # noqa: E402


def _tar(path: Path, rows: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for key, members in rows.items():
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _sample(caption: str, img: bytes = b"jpeg") -> dict[str, bytes]:
    return {
        "jpg": img,
        "txt": caption.encode(),
        "json": json.dumps({"captions": [caption, caption + "!"]}).encode(),
    }


def _read(url: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tf:
        for m in tf:
            k, _, ext = m.name.rpartition(".")
            out.setdefault(k, {})[ext] = tf.extractfile(m).read()
    return out


def test_oracle_shards_drop_faults_or_restore_one_true_caption(tmp_path):
    clean = _tar(tmp_path / "clean.tar", {k: _sample(f"true {k}", k.encode()) for k in ("a", "b", "c", "d")})
    corrupt = _tar(
        tmp_path / "corrupt-000000.tar",
        {
            "a": _sample("true a", b"a"),
            "b": _sample("true c", b"b"),  # shuffled: b and c swapped captions
            "c": _sample("true b", b"c"),
            "d": _sample("true d", b"d"),
            "d_exact_dup0": _sample("true d", b"d"),
            "blank_00000": _sample("true a", b"blank"),
        },
    )
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"shuffled": ["b", "c"], "exact_dup": {"d_exact_dup0": "d"}, "near_dup": {},
                                  "blank": ["blank_00000"], "shuffled_copies": []}))  # fmt: skip
    drop = curation_proof.oracle_shards([corrupt], str(faults), [clean], tmp_path / "o1", "drop")
    assert set(_read(drop[0])) == {"a", "d"}
    one = _read(curation_proof.oracle_shards([corrupt], str(faults), [clean], tmp_path / "o2", "one")[0])
    assert set(one) == {"a", "b", "c", "d"}
    for k in ("b", "c"):  # the image stays, its own first true caption comes back, the only one
        assert one[k]["jpg"] == k.encode() and one[k]["txt"] == f"true {k}".encode()
        assert json.loads(one[k]["json"])["captions"] == [f"true {k}"]
    assert one["a"] == _sample("true a", b"a") and one["d"]["txt"] == b"true d"  # clean rows untouched


def test_seed_table_means_sds_and_loss_recovered_on_means():
    test = {"a_clean": 0.16, "a_clean_s1": 0.14, "b_corrupted": 0.10, "b_corrupted_s1": 0.08,
            "c3_filtered_r2": 0.13, "c3_filtered_r2_s1": 0.11, "e_clean_mix05": 0.2}  # fmt: skip
    t = curation_proof.seed_table(test, {})
    assert t["a_clean"]["seeds"] == 2 and t["a_clean"]["test_mean"] == pytest.approx(0.15)
    assert t["a_clean"]["test_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert t["c3_filtered_r2"]["test_loss_recovered"] == pytest.approx((0.12 - 0.09) / (0.15 - 0.09))
    assert t["e_clean_mix05"]["test_sd"] is None and "test_loss_recovered" not in t["e_clean_mix05"]
    assert "val_mean" not in t["a_clean"]
