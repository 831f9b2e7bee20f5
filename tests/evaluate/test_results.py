"""Result files: shard fingerprints and comparison warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipforge.evaluate.results import compare, shard_fingerprint


def test_shard_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a-000000.tar", tmp_path / "a-000001.tar"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 20)
    fp = shard_fingerprint(str(tmp_path / "a-{000000..000001}.tar"))
    assert [f["bytes"] for f in fp["files"]] == [10, 20] and fp["method"] == "names+sizes"
    full = shard_fingerprint([str(a), str(b)], contents=True)
    b.write_bytes(b"z" * 20)  # same size, other bytes: only the contents hash sees it
    assert shard_fingerprint([str(a), str(b)])["sha256"] == fp["sha256"]
    assert shard_fingerprint([str(a), str(b)], contents=True)["sha256"] != full["sha256"]


def test_compare_rows_and_warnings() -> None:
    def res(top1: float, sha: str, templates: str) -> dict:
        return {"task": "zeroshot", "dataset": "d", "shards": {"sha256": sha}, "templates": templates,
                "metrics": {"top1": top1, "n_images": 10, "solver": "x"}}  # fmt: skip

    a = {"results": [res(0.5, "s1", "t"), {"task": "probe", "dataset": "d", "metrics": {}}]}
    b = {"results": [res(0.75, "s2", "u")]}
    rows, warnings = compare(a, b)
    assert ["zeroshot", "d", "top1", 0.5, 0.75, pytest.approx(0.25)] == rows[0]
    assert any("different shards" in w for w in warnings) and any(
        "different templates" in w for w in warnings
    )
    assert any("probe/d only in A" in w for w in warnings)
    assert all(r[2] != "solver" for r in rows)  # non-numeric metrics are not compared
