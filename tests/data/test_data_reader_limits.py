"""Crafted shards (issue 11.4, 11.8, 11.13): caps checked before reading, every case reported by key,
the good samples around it kept, memory bounded."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from data_testutils import good_sample, write_tar

from clipforge.data.reader import ReadLimits, iter_tar_samples
from clipforge.data.report import BadSampleReport


def _member(name: str, data: bytes, size: int | None = None, type_: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if size is None else size
    ti.type = type_
    block = ti.tobuf(tarfile.GNU_FORMAT)
    return block + data + b"\0" * (-len(data) % 512)


def _sample_bytes(key: str) -> bytes:
    return b"".join(_member(f"{key}.{ext}", v) for ext, v in good_sample(key).items() if ext != "__key__")


def _sparse_member(name: str, claimed: int) -> bytes:
    """A GNU sparse ('S') member: 512 stored bytes placed at the end of a file of ``claimed`` bytes."""
    hdr = bytearray(_member(name, b"", size=512, type_=tarfile.GNUTYPE_SPARSE)[:512])
    hdr[386:398] = tarfile.itn(claimed - 512, 12, tarfile.GNU_FORMAT)  # sparse map entry 0: offset
    hdr[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)  # ... numbytes
    hdr[482] = 0  # not extended
    hdr[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)  # real size
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr) + b"s" * 512


def _read(path: Path, limits: ReadLimits | None = None) -> tuple[list[str], BadSampleReport]:
    report = BadSampleReport()
    keys = [s["__key__"] for s in iter_tar_samples(str(path), report, limits)]
    return keys, report


def _shard(path: Path, *parts: bytes, gz: bool = False) -> Path:
    data = b"".join(parts) + b"\0" * 1024
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


def test_sparse_member_refused_unread(tmp_path: Path) -> None:
    """A 2 KB shard with a GNU sparse member claiming 256 MiB: read as 256 MiB before (11.4)."""
    shard = _shard(
        tmp_path / "s.tar", _sample_bytes("a"), _sparse_member("b.jpg", 256 << 20), _sample_bytes("c")
    )
    tracemalloc.start()
    t0 = time.monotonic()
    keys, report = _read(shard)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a", "c"] and dict(report.counts) == {"sparse_member": 1}
    assert report.keys["sparse_member"][0].startswith("s.tar:b")
    assert peak < 8 << 20 and time.monotonic() - t0 < 5


def test_member_over_cap_is_skipped_and_neighbours_kept(tmp_path: Path) -> None:
    big = {"__key__": "b", "jpg": b"\xff" * 5000, "txt": b"x"}
    shard = write_tar(tmp_path / "s.tar", [good_sample("a"), big, good_sample("c")])
    keys, report = _read(shard, ReadLimits(max_image_bytes=4096))
    assert keys == ["a", "c"] and dict(report.counts) == {"member_too_large": 1}
    keys, report = _read(shard, ReadLimits(max_text_bytes=0))  # captions over their own cap
    assert keys == [] and report.counts["member_too_large"] == 3


def test_member_claiming_64_gib_in_a_small_shard(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s.tar", _sample_bytes("a"), _member("b.jpg", b"\xff" * 100, size=64 << 30))
    keys, report = _read(shard)
    assert keys == ["a"] and report.counts["member_too_large"] == 1 and report.counts["truncated_shard"] == 1


def test_gzip_member_over_cap_skipped_in_bounded_memory(tmp_path: Path) -> None:
    """A .tar.gz whose 64 MiB member is zeros: skipped while streaming, never held (the 2 GiB case, smaller)."""
    shard = _shard(
        tmp_path / "s.tar.gz",
        _sample_bytes("a"),
        _member("b.jpg", bytes(64 << 20)),
        _sample_bytes("c"),
        gz=True,
    )
    assert shard.stat().st_size < 1 << 20
    tracemalloc.start()
    keys, report = _read(shard, ReadLimits(max_image_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a", "c"] and dict(report.counts) == {"member_too_large": 1}
    assert peak < 32 << 20  # zlib inflates a 10 KB read of zeros to ~10 MB: bounded, far below 64 MiB


def test_gzip_bomb_stops_the_shard_keeps_what_came_before(tmp_path: Path) -> None:
    shard = _shard(
        tmp_path / "s.tar.gz",
        _sample_bytes("a"),
        _member("b.jpg", bytes(64 << 20)),
        _sample_bytes("c"),
        gz=True,
    )
    tracemalloc.start()
    keys, report = _read(shard, ReadLimits(max_inflate_bytes=16 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a"] and dict(report.counts) == {"decompression_bomb": 1}
    assert peak < 32 << 20


@pytest.mark.parametrize("type_", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_huge_extended_header_is_refused_unread(tmp_path: Path, type_: bytes) -> None:
    """tarfile reads PAX / long-name headers whole: a gzip of zeros claiming 64 MiB would be held."""
    shard = _shard(
        tmp_path / "s.tar.gz",
        _sample_bytes("a"),
        _sample_bytes("a2"),  # the sample before damage may be missing parts: dropped and reported
        _member("././@x", bytes(64 << 20), type_=type_),
        gz=True,
    )
    tracemalloc.start()
    keys, report = _read(shard)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert keys == ["a"] and dict(report.counts) == {"truncated_shard": 1}
    assert report.keys["truncated_shard"][0].startswith("s.tar.gz:a2")
    assert peak < 32 << 20


def test_duplicate_member_is_reported_not_replaced(tmp_path: Path) -> None:
    """KEY.txt twice in one sample silently kept the second before (11.13)."""
    s = _sample_bytes("a") + _member("b.jpg", good_sample("b")["jpg"]) + _member("b.txt", b"one")
    shard = _shard(tmp_path / "s.tar", s, _member("b.txt", b"two"), _sample_bytes("c"))
    keys, report = _read(shard)
    assert keys == ["a", "c"] and dict(report.counts) == {"duplicate_member": 1}
    assert report.keys["duplicate_member"][0].startswith("s.tar:b")


@pytest.mark.parametrize(
    "key", ["../../evil", "/abs/path", "a/../../b", "x\x01y", "a//b", "a\\b", "ok\u2028"]
)
def test_unsafe_keys_are_reported(tmp_path: Path, key: str) -> None:
    shard = _shard(tmp_path / "s.tar", _sample_bytes("a"), _sample_bytes(key), _sample_bytes("c"))
    keys, report = _read(shard)
    assert keys == ["a", "c"] and dict(report.counts) == {"unsafe_key": 1}
    assert all(ord(ch) >= 32 for ch in report.keys["unsafe_key"][0])  # escaped in the report


def test_too_many_members_in_one_sample(tmp_path: Path) -> None:
    many = b"".join(_member(f"b.x{i}", b"1") for i in range(70))
    shard = _shard(tmp_path / "s.tar", _sample_bytes("a"), many, _sample_bytes("c"))
    keys, report = _read(shard)
    assert keys == ["a", "c"] and dict(report.counts) == {"sample_too_large": 1}


def test_limits_from_env(monkeypatch) -> None:
    monkeypatch.setenv("CLIPFORGE_MAX_IMAGE_MB", "2")
    monkeypatch.setenv("CLIPFORGE_MAX_TEXT_MB", "0.5")
    lim = ReadLimits.from_env()
    assert lim.member_cap("jpg") == 2 << 20 and lim.member_cap("json") == 1 << 19
    assert lim.member_cap("seg.png") == 2 << 20 and lim.member_cap("npy") == 64 << 20


def test_pax_sparse_from_gnu_tar(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    src = tmp_path / "src"
    src.mkdir()
    for k in ("a", "c"):
        for ext, v in good_sample(k).items():
            if ext != "__key__":
                (src / f"{k}.{ext}").write_bytes(v)
    with open(src / "b.jpg", "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(b"data")
    for fmt in ("gnu", "pax"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(
            [
                "tar",
                "--sparse",
                f"--format={fmt}",
                "-cf",
                str(out),
                "-C",
                str(src),
                "a.jpg",
                "a.txt",
                "b.jpg",
                "c.jpg",
                "c.txt",
            ],
            check=True,
        )
        assert out.stat().st_size < 1 << 20
        keys, report = _read(out)
        assert keys == ["a", "c"] and dict(report.counts) == {"sparse_member": 1}, fmt


def test_sample_io_untouched(tmp_path: Path) -> None:
    """Ordinary shards read exactly as before."""
    shard = write_tar(tmp_path / "s.tar", [good_sample(k) for k in "abc"])
    keys, report = _read(shard)
    assert keys == list("abc") and report.total == 0
    raw = next(iter_tar_samples(str(shard)))
    assert raw["txt"] == b"caption of a" and io.BytesIO(raw["jpg"]).read(2) == b"\xff\xd8"


def test_skipping_a_compressed_member_is_linear(tmp_path: Path, monkeypatch) -> None:
    """tarfile skips in 10 KB reads, each copying the inflated remainder: a 2 GiB member of a 2 MB
    .tar.gz took 102 s to skip. Skipped data is now read in 8 MiB reads."""
    shard = _shard(
        tmp_path / "s.tar.gz",
        _sample_bytes("a"),
        _member("b.jpg", bytes(64 << 20)),
        _sample_bytes("c"),
        gz=True,
    )
    calls = [0]
    real = tarfile._Stream.read

    def counting(self, size=-1):
        calls[0] += 1
        return real(self, size)

    monkeypatch.setattr(tarfile._Stream, "read", counting)
    keys, report = _read(shard, ReadLimits(max_image_bytes=1 << 20))
    assert keys == ["a", "c"] and dict(report.counts) == {"member_too_large": 1}
    assert calls[0] < 200, f"{calls[0]} stream reads to skip 64 MiB"
