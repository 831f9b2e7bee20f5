"""Shard reading: spec expansion (brace, glob, dir, http, pipe) and truncation detection."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from data_testutils import good_sample, write_tar

from clipforge.data.reader import count_samples, iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards


def _keys(url: str, report: BadSampleReport | None = None) -> list[str]:
    return [s["__key__"] for s in iter_tar_samples(url, report)]


@pytest.fixture()
def five(tmp_path: Path) -> Path:
    return write_tar(tmp_path / "five.tar", [good_sample(f"k{i}", i) for i in range(5)])


def _member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]


def test_complete_shard_reads_all(five: Path) -> None:
    r = BadSampleReport()
    samples = list(iter_tar_samples(str(five), r))
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(5)]
    assert set(samples[0]) >= {"jpg", "txt", "__shard__", "__url__"}
    assert r.total == 0


@pytest.mark.parametrize("member", [2, 4, 6])  # cut before the header of member N (2 members per sample)
def test_truncated_at_member_boundary_is_reported(five: Path, tmp_path: Path, member: int) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(five.read_bytes()[: _member_offsets(five)[member]])
    r = BadSampleReport()
    keys = _keys(str(cut), r)
    # the last sample before the cut might be incomplete: dropped and reported, earlier ones kept
    assert keys == [f"k{i}" for i in range(member // 2 - 1)]
    assert r.counts == {"truncated_shard": 1}
    assert r.keys["truncated_shard"][0].startswith(f"cut.tar:k{member // 2 - 1}")


def test_truncated_mid_member_and_garbage(five: Path, tmp_path: Path) -> None:
    data = five.read_bytes()
    offs = _member_offsets(five)
    mid = tmp_path / "mid.tar"
    mid.write_bytes(data[: offs[6] + 700])  # inside k3.jpg: k0..k2 complete
    r = BadSampleReport()
    assert _keys(str(mid), r) == ["k0", "k1", "k2"]
    assert r.counts == {"truncated_shard": 1}
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(data[: offs[6]] + b"\x17" * 1024)
    r = BadSampleReport()
    assert _keys(str(garbage), r) == ["k0", "k1"]
    assert r.counts == {"truncated_shard": 1}


def test_empty_and_missing_shards(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    r = BadSampleReport()
    assert _keys(str(empty), r) == []
    assert r.counts == {"truncated_shard": 1}
    r = BadSampleReport()
    assert _keys(str(tmp_path / "nope.tar"), r) == []
    assert r.counts == {"unreadable_shard": 1}


def test_spec_expansion_brace_glob_dir(tmp_path: Path) -> None:
    for i in range(3):
        write_tar(tmp_path / f"s-{i:06d}.tar", [good_sample(f"a{i}", i)])
    brace = expand_shards(str(tmp_path / "s-{000000..000002}.tar"))
    assert [Path(u).name for u in brace] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_shards(str(tmp_path / "s-*.tar")) == brace
    assert expand_shards(tmp_path) == brace
    mixed = expand_shards([str(tmp_path / "s-000002.tar"), str(tmp_path / "s-{000000..000001}.tar")])
    assert [Path(u).name for u in mixed] == ["s-000002.tar", "s-000000.tar", "s-000001.tar"]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "missing-*.tar"))


def test_pipe_and_http_specs(five: Path, file_server: tuple[str, Path]) -> None:
    base, root = file_server
    (root / "five.tar").write_bytes(five.read_bytes())
    want = _keys(str(five))
    assert _keys(f"pipe:cat {five}") == want
    url = f"{base}/five.tar"
    assert expand_shards(url) == [url]
    r = BadSampleReport()
    assert _keys(url, r) == want and r.total == 0
    assert _keys(f"{base}/missing.tar", r) == [] and r.counts == {"unreadable_shard": 1}
    r = BadSampleReport()
    assert _keys("pipe:cat /nonexistent/x.tar 2>/dev/null", r) == [] and r.counts == {"unreadable_shard": 1}


def test_count_samples_real_shard(flickr_test_shard: Path) -> None:
    n, nbytes = count_samples(str(flickr_test_shard))
    assert n == 1000
    assert nbytes > 1_000_000


def test_corrupt_image_detail_is_the_same_in_every_run() -> None:
    """PIL names the BytesIO it could not read with its address: reports must not differ run to run."""
    from clipforge.data.decode import decode_image
    from clipforge.data.skip import SkipSample

    details = set()
    for _ in range(3):
        try:
            decode_image(b"not an image at all")
        except SkipSample as e:
            assert e.reason == "corrupt_image"
            details.add(e.detail)
    assert len(details) == 1 and "0x" not in details.pop()
