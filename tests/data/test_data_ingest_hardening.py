"""Ingest regression tests for issue 11: 8 (unsafe keys), 9/13 (output dir, stale .tmp), 10 (CSV cells),
14 (--root confinement), 15 (decode pixel budget)."""

from __future__ import annotations

import json
import os
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from data_testutils import good_sample, image_bytes, write_tar

from clipforge.cli import main
from clipforge.data.decode import PixelBudget
from clipforge.data.ingest import IngestConfig, ingest
from clipforge.data.reader import iter_tar_samples
from clipforge.data.tables import BadRow, read_table_rows
from clipforge.utils import OutputExistsError


def _cfg(out: Path, **kw) -> IngestConfig:
    kw.setdefault("workers", 2)
    return IngestConfig(output=out, **kw)


def _keys(out: Path) -> list[str]:
    return [s["__key__"] for p in sorted(out.glob("*.tar")) for s in iter_tar_samples(str(p))]


def test_reshard_refuses_traversal_keys(tmp_path: Path) -> None:
    """``ingest --from shards`` copied ``../../evil`` and ``/abs/path`` into its output (11.8)."""
    src = write_tar(
        tmp_path / "in.tar",
        [good_sample("ok1"), good_sample("../../evil"), good_sample("/abs/path"), good_sample("ok2")],
    )
    out = tmp_path / "out"
    stats = ingest([str(src)], _cfg(out), kind="shards", progress=False)
    assert stats["written"] == 2 and stats["skipped_by_reason"] == {"unsafe_key": 2}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tf:
            assert all(not n.startswith(("/", "..")) and ".." not in n.split("/") for n in tf.getnames())
    extract = tmp_path / "x" / "y"
    extract.mkdir(parents=True)
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tf:
            tf.extractall(extract, filter="data")
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "x" / "evil.jpg").exists()


def _table_dir(tmp_path: Path) -> Path:
    d = tmp_path / "t"
    (d / "img").mkdir(parents=True)
    for i in range(3):
        (d / "img" / f"{i}.jpg").write_bytes(image_bytes(seed=i))
    return d


def test_csv_huge_cell_costs_one_row(tmp_path: Path) -> None:
    """A 131,073-char cell ended ingest with a _csv.Error traceback and no shards (11.10)."""
    d = _table_dir(tmp_path)
    table = d / "pairs.csv"
    table.write_text(
        "url,caption\n"
        "img/0.jpg,first\n"
        f'img/1.jpg,"{"x" * 131_073}"\n'
        f"img/1.jpg,{'y' * 3_000_000}\n"  # a line over 4x the cell cap: skipped without holding it
        "img/2.jpg,third\n"
    )
    out = tmp_path / "out"
    stats = ingest([str(table)], _cfg(out, max_cell_chars=200_000), progress=False)
    assert stats["written"] == 2
    assert stats["skipped_by_reason"] == {"caption_too_long": 1, "row_too_large": 1}
    assert _keys(out) == ["000000000", "000000003"]  # row numbers (keys) unchanged by the bad rows
    # the CLI default (1 Mi chars) keeps the run alive too
    assert main(["data", "ingest", str(table), "--output", str(tmp_path / "out2"), "--json"]) == 0


def test_table_reader_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_bytes(
        b'\xef\xbb\xbfurl,caption\na.jpg,ok\nb.jpg,caf\xe9\n\nc.jpg,x,y,z\nd.jpg,"q""uote"\ne.jpg\n'
    )
    rows = list(read_table_rows(p))
    assert rows[0] == {"url": "a.jpg", "caption": "ok"}
    assert isinstance(rows[1], BadRow) and rows[1].reason == "not_utf8"
    assert isinstance(rows[2], BadRow) and rows[2].reason == "bad_row"
    assert rows[3] == {"url": "d.jpg", "caption": 'q"uote'} and rows[4] == {"url": "e.jpg", "caption": None}
    j = tmp_path / "t.jsonl"
    j.write_bytes(b'{"url": "a"}\n[1]\n{bad\n\xff\xfe\n' + b'{"url": "' + b"z" * 5000 + b'"}\n{"url": "b"}\n')
    rows = list(read_table_rows(j, max_cell_chars=1000))
    assert [r.reason if isinstance(r, BadRow) else r["url"] for r in rows] == [
        "a",
        "bad_row",
        "bad_row",
        "not_utf8",
        "row_too_large",
        "b",
    ]


def test_jsonl_bad_line_costs_one_row(tmp_path: Path) -> None:
    """A bad JSONL line used to end ingest with ValueError."""
    d = _table_dir(tmp_path)
    table = d / "pairs.jsonl"
    table.write_text('{"url": "img/0.jpg", "caption": "a"}\n{oops\n{"url": "img/2.jpg", "caption": "c"}\n')
    stats = ingest([str(table)], _cfg(tmp_path / "out"), progress=False)
    assert stats["written"] == 2 and stats["skipped_by_reason"] == {"bad_row": 1}


def test_table_paths_confined_to_root(tmp_path: Path) -> None:
    """Absolute, ``../`` and symlinked cells read arbitrary local files into shards before (11.14)."""
    d = _table_dir(tmp_path)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(seed=9))
    (d / "img" / "link.jpg").symlink_to(secret)
    (d / "fifo.jpg").parent.mkdir(exist_ok=True)
    os.mkfifo(d / "fifo.jpg")
    table = d / "pairs.csv"
    rows = [
        f"{secret},abs",
        "../secret.jpg,dotdot",
        "img/link.jpg,symlink",
        "img/0.jpg,inside",
        "fifo.jpg,fifo",
    ]
    table.write_text("url,caption\n" + "\n".join(rows) + "\n")
    stats = ingest([str(table)], _cfg(tmp_path / "out"), progress=False)
    assert stats["written"] == 1
    assert stats["skipped_by_reason"] == {"outside_root": 3, "not_a_file": 1}
    # --root widens the confinement explicitly; --no-confine trusts the table
    stats = ingest([str(table)], _cfg(tmp_path / "out2", root=tmp_path), progress=False)
    assert stats["written"] == 4 and stats["skipped_by_reason"] == {"not_a_file": 1}
    stats = ingest([str(table)], _cfg(tmp_path / "out3", confine=False), progress=False)
    assert stats["written"] == 4


def test_folder_symlinks_out_of_root_refused(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(image_bytes(seed=3))
    (outside / "passwd").write_text("root:x:0:0")
    (src / "a.jpg").write_bytes(image_bytes(seed=1))
    (src / "a.txt").write_text("inside")
    (src / "b.jpg").symlink_to(outside / "x.jpg")
    (src / "b.txt").write_text("image outside")
    (src / "c.jpg").write_bytes(image_bytes(seed=2))
    (src / "c.txt").symlink_to(outside / "passwd")  # a caption that would copy a local file
    (src / "sub").symlink_to(outside, target_is_directory=True)
    stats = ingest([str(src)], _cfg(tmp_path / "out"), progress=False)
    assert stats["written"] == 1 and stats["skipped_by_reason"] == {"outside_root": 2}
    assert all(b"root:x" not in p.read_bytes() for p in (tmp_path / "out").glob("*.tar"))


def test_file_size_caps_checked_before_reading(tmp_path: Path) -> None:
    from clipforge.data.reader import ReadLimits

    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(64, 64, seed=1))
    (src / "a.txt").write_text("fine")
    (src / "b.jpg").write_bytes(image_bytes(seed=2))
    (src / "b.txt").write_text("w " * 2000)
    stats = ingest(
        [str(src)],
        _cfg(
            tmp_path / "out",
            limits=ReadLimits(max_image_bytes=len((src / "a.jpg").read_bytes()) - 1, max_text_bytes=100),
        ),
        progress=False,
    )
    assert stats["written"] == 0 and stats["skipped_by_reason"] == {"file_too_large": 2}


def test_output_dir_rule_and_stale_tmp(tmp_path: Path) -> None:
    """A second run into the same --output is refused (or replaced with --overwrite); .tmp left by a
    killed writer is cleaned (11.9, 11.13)."""
    src = write_tar(tmp_path / "in.tar", [good_sample("a"), good_sample("b")])
    out = tmp_path / "out"
    ingest([str(src)], _cfg(out), progress=False)
    stale = out / ".shard-000009.tar.abc.tmp"
    stale.write_bytes(b"half a shard")
    with pytest.raises(OutputExistsError):
        ingest([str(src)], _cfg(out), progress=False)
    assert main(["data", "ingest", str(src), "--output", str(out)]) == 2
    stats = ingest([str(src)], _cfg(out, overwrite=True), progress=False)
    assert stats["written"] == 2 and not stale.exists() and _keys(out) == ["a", "b"]
    with pytest.raises(ValueError, match="inside --output"):
        ingest([str(out)], _cfg(out, overwrite=True), kind="shards", progress=False)


def test_retry_list_only_takes_urls(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "img.jpg").write_bytes(image_bytes())
    retry = tmp_path / "retry.jsonl"
    retry.write_text(
        json.dumps({"key": "000000001", "source": str(tmp_path / "img.jpg"), "caption": "c"}) + "\n{bad\n"
    )
    stats = ingest([], _cfg(out), retry_from=str(retry), progress=False)
    assert stats["written"] == 0 and Counter(stats["skipped_by_reason"]) == {"bad_retry_row": 1, "bad_row": 1}


def test_pixel_budget_caps_concurrent_decodes() -> None:
    budget = PixelBudget(100)
    active, peak, lock = [0], [0], threading.Lock()
    start = threading.Barrier(6)

    def work() -> None:
        start.wait()
        with budget.hold(60):
            with budget.hold(60):  # nested holds by the same thread pass through
                with lock:
                    active[0] += 1
                    peak[0] = max(peak[0], active[0])
                threading.Event().wait(0.02)
                with lock:
                    active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 1 and budget.peak == 60 and budget.used == 0
    with PixelBudget(10).hold(1000):  # one image over the budget still goes, alone
        pass
