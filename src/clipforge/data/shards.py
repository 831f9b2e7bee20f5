"""Shard specs -> concrete shard URLs, and opening them as byte streams.

A spec is a local path, a glob (``data/*.tar``), a brace range (``train-{000000..000005}.tar``),
an ``http(s)://`` URL or a ``pipe:CMD`` (as webdataset writes them). Several specs may be mixed.
"""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from braceexpand import braceexpand

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def expand_shards(specs: str | Path | Iterable[str | Path]) -> list[str]:
    """Expand specs (paths, globs, brace ranges, URLs) in order; local globs are sorted.

    Raises FileNotFoundError for a local spec that matches nothing, so a typo never trains on nothing.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith("pipe:"):
            out.append(spec)
            continue
        for s in braceexpand(spec):
            if is_remote(s):
                out.append(s)
            elif any(c in s for c in "*?["):
                matches = sorted(glob.glob(os.path.expanduser(s)))
                if not matches:
                    raise FileNotFoundError(f"shard glob matched nothing: {s}")
                out.extend(matches)
            elif os.path.isdir(s):
                matches = sorted(glob.glob(os.path.join(s, "*.tar")))
                if not matches:
                    raise FileNotFoundError(f"no .tar shards in directory: {s}")
                out.extend(matches)
            else:
                if not os.path.exists(os.path.expanduser(s)):
                    raise FileNotFoundError(f"shard not found: {s}")
                out.append(os.path.expanduser(s))
    return out


class _PipeStream:
    """File-like wrapper over a subprocess's stdout that reports a failing command."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.stream = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def close(self) -> None:
        self.stream.close()
        rc = self.proc.wait()
        if rc not in (0, -13, 141):  # SIGPIPE on early close is fine
            raise OSError(f"pipe command failed with exit code {rc}: {self.cmd}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_shard(url: str, timeout: float = 60.0) -> IO[bytes]:
    """Open a shard for sequential reading (local file, http(s) stream, or ``pipe:`` command)."""
    if url.startswith("pipe:"):
        return _PipeStream(url[5:])  # type: ignore[return-value]
    if url.startswith(("http://", "https://")):
        import requests

        r = requests.get(url, stream=True, timeout=timeout)
        r.raise_for_status()
        r.raw.decode_content = True
        return r.raw
    if url.startswith(("s3://", "gs://")):
        import fsspec  # optional: installed with the cloud extras of fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=1 << 20)


def shard_name(url: str) -> str:
    """Short, stable name of a shard (its file name), used in reports and side tables."""
    if url.startswith("pipe:"):
        return url
    return Path(url.split("?")[0]).name
