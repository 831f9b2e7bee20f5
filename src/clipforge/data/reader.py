"""Read webdataset tar shards as raw samples: ``{"__key__", "__shard__", ext: bytes, ...}``.

A thin reader over :mod:`tarfile` (stream mode) rather than the ``webdataset`` pipeline: it reads
member data straight from the tar stream (no per-member file object), so it runs at raw ``tarfile``
speed (see benchmarks/bench_data.py); it never raises mid-run on a truncated or corrupt shard (the
damage is reported by shard and key); and it gives an explicit sample ordinal per shard, which exact
resume needs.

``tarfile`` in stream mode ends *silently* when a shard is cut exactly at a member boundary (no
end-of-archive zero blocks) or when garbage follows the last member. We record how the archive ended
(:class:`_EndAwareTarInfo`) and report both cases as ``truncated_shard``.

Shards are untrusted (issue 11.4, 11.8, 11.13). Before a member's data is read its header is checked
against :class:`ReadLimits`, and a sample with any of these problems is skipped and reported by key,
while the samples around it are kept:

- ``member_too_large``: the header claims more than the cap for its kind (image / text / other);
- ``sparse_member``: GNU/PAX sparse members (a 51 KB file can claim 64 GiB) are refused unread;
- ``sample_too_large``: too many members or bytes in one sample;
- ``duplicate_member``: the same extension twice in one sample (which one is right is unknowable);
- ``unsafe_key``: ``..``/leading ``/``/control characters (see :mod:`clipforge.data.keys`).

Headers themselves are bounded (a PAX or GNU long-name header claiming more than 1 MiB ends the shard
as damaged), and a compressed shard may not inflate beyond ``max(max_inflate_bytes,
max_inflate_ratio x compressed bytes read)``: past that the shard stops with ``decompression_bomb``.
Memory per reader is therefore bounded by the per-sample cap, whatever the shard claims.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from clipforge.data.decode import IMAGE_EXTS
from clipforge.data.fields import LABEL_EXTS, TEXT_EXTS
from clipforge.data.keys import printable, unsafe_key_reason
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import open_shard, shard_name

# Same key rule as webdataset: the key is the member path up to the first dot of its basename.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_MB = 1 << 20
_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
MAX_HEADER_BYTES = _MB  # PAX / GNU long-name headers are read whole by tarfile: keep them small
MAX_SPARSE_ENTRIES = 10_000

Sample = dict[str, Any]


@dataclass(frozen=True)
class ReadLimits:
    """Caps checked on member headers before any data is read. Environment overrides (MiB):
    ``CLIPFORGE_MAX_IMAGE_MB``, ``CLIPFORGE_MAX_TEXT_MB``, ``CLIPFORGE_MAX_MEMBER_MB``,
    ``CLIPFORGE_MAX_SAMPLE_MB``, ``CLIPFORGE_MAX_INFLATE_MB`` (so DataLoader workers of every command
    see the same limits)."""

    max_image_bytes: int = 64 * _MB  # KEY.jpg/png/...
    max_text_bytes: int = 1 * _MB  # KEY.txt/caption/text/json/cls
    max_other_bytes: int = 64 * _MB  # any other extension (npy, mp4, ...)
    max_sample_bytes: int = 256 * _MB  # all members of one sample
    max_members: int = 64  # members per sample
    max_inflate_bytes: int = 4096 * _MB  # a compressed shard may always inflate this far...
    max_inflate_ratio: float = 100.0  # ...or this many times the compressed bytes read so far

    @classmethod
    def from_env(cls) -> ReadLimits:
        env = {
            "max_image_bytes": "CLIPFORGE_MAX_IMAGE_MB",
            "max_text_bytes": "CLIPFORGE_MAX_TEXT_MB",
            "max_other_bytes": "CLIPFORGE_MAX_MEMBER_MB",
            "max_sample_bytes": "CLIPFORGE_MAX_SAMPLE_MB",
            "max_inflate_bytes": "CLIPFORGE_MAX_INFLATE_MB",
        }
        kw = {f: int(float(os.environ[v]) * _MB) for f, v in env.items() if os.environ.get(v)}
        return cls(**kw)

    def member_cap(self, ext: str) -> int:
        last = ext.rsplit(".", 1)[-1]
        if last in IMAGE_EXTS:
            return self.max_image_bytes
        if last in TEXT_EXTS or last in LABEL_EXTS or last == "json":
            return self.max_text_bytes
        return self.max_other_bytes


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.ext.more"`` -> ``("dir/KEY", "ext.more")``; None for names without an extension."""
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


class _RefusedHeader(tarfile.SubsequentHeaderError):
    """A header tarfile would otherwise read whole into memory (huge PAX/long-name/sparse map)."""


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why header reading stopped (only a zero block is a clean end), and refuses
    headers whose own payload tarfile would read into memory unbounded."""

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._clipforge_end = e  # EOFHeaderError = proper end-of-archive marker
            raise

    def _proc_member(self, tf):  # type: ignore[override]
        if self.type in _META_TYPES and not 0 <= self.size <= MAX_HEADER_BYTES:
            raise _RefusedHeader(f"extended header claims {self.size} bytes (> {MAX_HEADER_BYTES})")
        return super()._proc_member(tf)

    def _proc_gnusparse_10(self, next, pax_headers, tf):  # type: ignore[override]
        """GNU sparse 1.0 keeps its map in the data area; tarfile reads all of it: cap the entries."""
        head = tf.fileobj.read(tarfile.BLOCKSIZE)
        first = head.split(b"\n", 1)[0]
        if not first.strip().isdigit() or int(first) > MAX_SPARSE_ENTRIES:
            raise _RefusedHeader(f"sparse map claims {first[:20]!r} entries")
        fields, buf = head.split(b"\n", 1)
        numbers: list[int] = []
        while len(numbers) < int(fields) * 2:
            if b"\n" not in buf:
                more = tf.fileobj.read(tarfile.BLOCKSIZE)
                if not more:
                    raise tarfile.TruncatedHeaderError("truncated sparse map")
                buf += more
            number, buf = buf.split(b"\n", 1)
            numbers.append(int(number))
        next.offset_data = tf.fileobj.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2]))


class _CountingReader:
    """Counts the (compressed) bytes tarfile pulls from the shard stream."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.nread = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.nread += len(data)
        return data


class _Bomb(Exception):
    pass


_SKIP_CHUNK = 8 << 20


def _skip_to_next_header(tf: tarfile.TarFile) -> None:
    """Discard the data of the member just passed over, in big reads.

    tarfile's own skip (``_Stream.seek``) reads 10 KB at a time and, on a compressed stream, copies the
    whole inflated remainder on every read: skipping a 2 GiB member of a 2 MB .tar.gz took 102 s. In
    8 MiB reads it is linear (and memory stays at one read plus one inflated block).
    """
    if tf.firstmember is not None:  # read by TarFile.__init__, its data not reached yet
        return
    left = tf.offset - tf.fileobj.tell()
    while left > 0:
        got = len(tf.fileobj.read(min(left, _SKIP_CHUNK)))
        if got == 0:
            return  # end of data: tf.next() reports it
        left -= got


def _end_problem(tf: tarfile.TarFile) -> str | None:
    """None if the archive ended with its end-of-archive marker, else what went wrong."""
    end = getattr(tf, "_clipforge_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    if end is None or isinstance(end, tarfile.EmptyHeaderError):
        return "shard ends at a member boundary without the end-of-archive marker (truncated)"
    return f"{type(end).__name__}: {end} (truncated or corrupt header)"


def _member_problem(
    member: tarfile.TarInfo, key: str, ext: str, current: Sample | None, limits: ReadLimits
) -> tuple[str, str] | None:
    """(reason, detail) when this member makes its sample unusable, checked before reading its data."""
    why = unsafe_key_reason(key)
    if why is not None:
        return "unsafe_key", why
    if member.issparse():
        return "sparse_member", f"{printable(member.name)}: sparse member claiming {member.size} bytes"
    cap = limits.member_cap(ext)
    if not 0 <= member.size <= cap:
        return "member_too_large", f"{printable(member.name)}: {member.size} bytes > cap {cap}"
    if current is not None:
        if ext in current:
            return "duplicate_member", f"{printable(member.name)} appears twice in one sample"
        n = sum(1 for k in current if not k.startswith("__"))
        size = sum(len(v) for k, v in current.items() if not k.startswith("__"))
        if n + 1 > limits.max_members or size + member.size > limits.max_sample_bytes:
            return "sample_too_large", f"over {limits.max_members} members or {limits.max_sample_bytes} bytes"
    return None


def iter_tar_samples(
    url: str, report: BadSampleReport | None = None, limits: ReadLimits | None = None
) -> Iterator[Sample]:
    """Yield the samples of one shard in file order, grouping consecutive members by key.

    A truncated or unreadable shard ends early: the partial last sample and the shard are recorded in
    ``report`` (reason ``truncated_shard``); every complete sample before the damage is still yielded.
    The sample being read when the damage hit is dropped, since it may be missing parts. A sample
    whose header checks fail (module docstring) is skipped and reported; reading goes on after it.
    """
    limits = limits or ReadLimits.from_env()
    name = shard_name(url)
    current: Sample | None = None
    bad_key: str | None = None  # the sample being skipped: its remaining members are not read

    def add(key: str, reason: str, detail: str = "") -> None:
        if report is not None:
            report.add(key, reason, detail)

    try:
        stream = open_shard(url)
    except Exception as e:  # missing remote shard, failing pipe, permission error...
        add(name, "unreadable_shard", f"{type(e).__name__}: {e}")
        return
    counted = _CountingReader(stream)
    damage: tuple[str, str] | None = None
    try:
        with tarfile.open(fileobj=counted, mode="r|*", tarinfo=_EndAwareTarInfo) as tf:  # type: ignore[arg-type]
            compressed = getattr(tf.fileobj, "comptype", "tar") != "tar"
            while True:
                _skip_to_next_header(tf)
                member = tf.next()
                if member is None:
                    break
                tf.members.clear()  # stream mode keeps every header otherwise: memory grows per shard
                parts = split_member_name(member.name) if member.isfile() else None
                if current is not None and parts is not None and current["__key__"] != parts[0]:
                    yield current  # complete: a new key started
                    current = None
                if compressed:
                    allowed = max(limits.max_inflate_bytes, limits.max_inflate_ratio * counted.nread)
                    if tf.offset > allowed:  # where the next header starts, in inflated bytes
                        raise _Bomb(
                            f"compressed shard would inflate past {int(allowed)} bytes "
                            f"({counted.nread} compressed bytes read; member {printable(member.name)} "
                            f"claims {member.size})"
                        )
                if not member.isfile():
                    continue
                if parts is None:
                    add(f"{name}/{printable(member.name)}", "unnamed_member")
                    continue
                key, ext = parts
                if bad_key is not None and bad_key != key:
                    bad_key = None
                if bad_key == key:
                    continue  # tf.next() skips the data without keeping it
                problem = _member_problem(member, key, ext, current, limits)
                if problem is not None:
                    add(f"{name}:{printable(key)}", *problem)
                    current, bad_key = None, key
                    continue
                if current is None:
                    current = {"__key__": key, "__shard__": name, "__url__": url}
                data = tf.fileobj.read(member.size)  # positioned at the member's data after next()
                if len(data) != member.size:
                    raise EOFError(
                        f"member {printable(member.name)} truncated ({len(data)} of {member.size} bytes)"
                    )
                current[ext] = data
            problem = _end_problem(tf)
            damage = ("truncated_shard", problem) if problem else None
    except _Bomb as e:
        damage = ("decompression_bomb", str(e))
    except (
        Exception
    ) as e:  # tarfile/zlib/lzma/bz2 errors on corrupt data: the shard is damaged, the run goes on
        damage = ("truncated_shard", f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        try:
            stream.close()
        except Exception as e:  # e.g. the pipe command failed: that explains any damage seen
            add(name, "unreadable_shard", f"{type(e).__name__}: {e}" + (f"; {damage[1]}" if damage else ""))
            damage, current = None, None
    if damage is not None:
        lost = printable(current["__key__"]) if current is not None else "<none>"
        add(f"{name}:{lost}", *damage)
        current = None  # the sample being read when the damage hit may be missing parts: never yield it
    if current is not None:
        yield current


def count_samples(url: str, report: BadSampleReport | None = None) -> tuple[int, int]:
    """(samples, bytes of member data) in one shard, without decoding anything."""
    n = nbytes = 0
    for s in iter_tar_samples(url, report):
        n += 1
        nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
    return n, nbytes
