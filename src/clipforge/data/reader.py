"""Read webdataset tar shards as raw samples: ``{"__key__", "__shard__", ext: bytes, ...}``.

A thin reader over :mod:`tarfile` (stream mode) rather than the ``webdataset`` pipeline: it reads
member data straight from the tar stream (no per-member file object), so it runs at raw ``tarfile``
speed (see benchmarks/bench_data.py); it never raises mid-run on a truncated or corrupt shard (the
damage is reported by shard and key); and it gives an explicit sample ordinal per shard, which exact
resume needs.

``tarfile`` in stream mode ends *silently* when a shard is cut exactly at a member boundary (no
end-of-archive zero blocks) or when garbage follows the last member. We record how the archive ended
(:class:`_EndAwareTarInfo`) and report both cases as ``truncated_shard``.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

from clipforge.data.report import BadSampleReport
from clipforge.data.shards import open_shard, shard_name

# Same key rule as webdataset: the key is the member path up to the first dot of its basename.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")

Sample = dict[str, Any]


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.ext.more"`` -> ``("dir/KEY", "ext.more")``; None for names without an extension."""
    m = _KEY_RE.match(name)
    if not m:
        return None
    return m.group(1), m.group(2).lower()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why header reading stopped: only a zero block is a clean end."""

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._clipforge_end = e  # EOFHeaderError = proper end-of-archive marker
            raise


def _end_problem(tf: tarfile.TarFile) -> str | None:
    """None if the archive ended with its end-of-archive marker, else what went wrong."""
    end = getattr(tf, "_clipforge_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    if end is None or isinstance(end, tarfile.EmptyHeaderError):
        return "shard ends at a member boundary without the end-of-archive marker (truncated)"
    return f"{type(end).__name__}: {end} (truncated or corrupt header)"


def iter_tar_samples(url: str, report: BadSampleReport | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard in file order, grouping consecutive members by key.

    A truncated or unreadable shard ends early: the partial last sample and the shard are recorded in
    ``report`` (reason ``truncated_shard``); every complete sample before the damage is still yielded.
    The sample being read when the damage hit is dropped, since it may be missing parts.
    """
    name = shard_name(url)
    current: Sample | None = None
    try:
        stream = open_shard(url)
    except Exception as e:  # missing remote shard, failing pipe, permission error...
        if report is not None:
            report.add(name, "unreadable_shard", f"{type(e).__name__}: {e}")
        return
    damage: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo) as tf:
            while True:
                member = tf.next()
                if member is None:
                    break
                tf.members.clear()  # stream mode keeps every header otherwise: memory grows per shard
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    if report is not None:
                        report.add(f"{name}/{member.name}", "unnamed_member")
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    yield current  # complete: a new key started
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": name, "__url__": url}
                if member.sparse is None:
                    data = tf.fileobj.read(member.size)  # positioned at the member's data after next()
                else:  # pragma: no cover - GNU sparse members never appear in webdataset shards
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
                current[ext] = data
            damage = _end_problem(tf)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        damage = f"{type(e).__name__}: {e}"
    finally:
        try:
            stream.close()
        except Exception as e:  # e.g. the pipe command failed: that explains any damage seen
            if report is not None:
                report.add(
                    name, "unreadable_shard", f"{type(e).__name__}: {e}" + (f"; {damage}" if damage else "")
                )
            damage, current = None, None
    if damage is not None:
        if report is not None:
            lost = current["__key__"] if current is not None else "<none>"
            report.add(f"{name}:{lost}", "truncated_shard", damage)
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
