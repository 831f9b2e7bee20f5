"""Shard specs -> concrete shard URLs, and opening them as byte streams.

A spec is a local path, a glob (``data/*.tar``), a brace range (``train-{000000..000005}.tar``),
an ``http(s)://`` URL or a ``pipe:CMD`` (as webdataset writes them). Several specs may be mixed.

Where commands come from (issue 11, items 1-2): a ``pipe:`` spec runs a shell command, so it is honoured
only when a person typed it, i.e. as an explicit command-line/API argument to :func:`expand_shards`.

- What a glob or a directory expands to is always a plain file: a file named ``pipe:touch x;.tar`` is
  returned as ``./pipe:touch x;.tar``, which :func:`open_shard` opens as a file (never a command).
- Every list of shards read back from a file (manifests, run configs, checkpoints' data positions,
  index manifests, retry lists) goes through :func:`shards_from_file`, which refuses ``pipe:`` with a
  message saying so (:class:`ShardSpecError`). ``expand_shards(..., allow_pipe=False)`` is the same
  check for API callers that want it.
"""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from braceexpand import braceexpand

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")
PIPE_PREFIX = "pipe:"


class ShardSpecError(ValueError):
    """A shard spec that is refused (e.g. ``pipe:`` read back from a file)."""


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def plain_file(path: str) -> str:
    """A local path that no reader can take for a URL or a ``pipe:`` command (``./`` prefixed if needed)."""
    if os.path.isabs(path) or path.startswith(("./", "../")):
        return path
    first = path.split("/", 1)[0]
    if ":" in first or first.startswith("~") or is_remote(path):
        return "./" + path
    return path


def _refuse_pipe(spec: str, source: str) -> None:
    if spec.lstrip().startswith(PIPE_PREFIX):
        raise ShardSpecError(
            f"refusing shard spec {spec[:200]!r} from {source}: 'pipe:' runs a shell command and is only "
            "honoured as an explicit command-line/API argument, never from a list read back from a file "
            "(manifest, run config, checkpoint, index manifest, retry list); if you trust it, pass it "
            "on the command line"
        )


def expand_shards(
    specs: str | Path | Iterable[str | Path], *, allow_pipe: bool = True, source: str = "a file"
) -> list[str]:
    """Expand specs (paths, globs, brace ranges, URLs) in order; local globs are sorted.

    Glob and directory matches come back as plain files (:func:`plain_file`), never as commands or
    URLs. ``allow_pipe=False`` refuses ``pipe:`` specs (:class:`ShardSpecError` naming ``source``):
    use :func:`shards_from_file` for any list that was not typed by the user.
    Raises FileNotFoundError for a local spec that matches nothing, so a typo never trains on nothing.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        if not isinstance(spec, (str, Path)):
            raise ShardSpecError(f"shard spec from {source} is not a string: {str(spec)[:100]!r}")
        spec = str(spec)
        if spec.startswith(PIPE_PREFIX):
            if not allow_pipe:
                _refuse_pipe(spec, source)
            out.append(spec)
            continue
        for s in braceexpand(spec):
            if not allow_pipe:
                _refuse_pipe(s, source)
            if is_remote(s):
                out.append(s)
            elif any(c in s for c in "*?["):
                matches = sorted(glob.glob(os.path.expanduser(s)))
                if not matches:
                    raise FileNotFoundError(f"shard glob matched nothing: {s}")
                out.extend(plain_file(m) for m in matches)
            elif os.path.isdir(s):
                matches = sorted(glob.glob(os.path.join(glob.escape(s), "*.tar")))
                if not matches:
                    raise FileNotFoundError(f"no .tar shards in directory: {s}")
                out.extend(plain_file(m) for m in matches)
            else:
                if not os.path.exists(os.path.expanduser(s)):
                    raise FileNotFoundError(f"shard not found: {s}")
                out.append(os.path.expanduser(s))
    return out


def shards_from_file(specs: Any, *, source: str, expand: bool = True) -> list[str]:
    """THE sanitizer for shard lists read back from a file (manifest, run config, checkpoint, retry list).

    ``pipe:`` entries (also after brace expansion) are refused with :class:`ShardSpecError` naming
    ``source`` (e.g. ``"DIR/manifest.json"``); everything else is what :func:`expand_shards` gives.
    ``expand=False`` only validates and returns the entries as strings (for lists that are compared or
    stored, not opened, or whose files may be gone).
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    if not isinstance(specs, (list, tuple)):
        raise ShardSpecError(f"shard list from {source} is not a list: {type(specs).__name__}")
    checked: list[str] = []
    for spec in specs:
        if not isinstance(spec, (str, Path)):
            raise ShardSpecError(f"shard spec from {source} is not a string: {str(spec)[:100]!r}")
        spec = str(spec)
        _refuse_pipe(spec, source)
        for s in braceexpand(spec):
            _refuse_pipe(s, source)
        checked.append(spec)
    if not expand:
        return checked
    return expand_shards(checked, allow_pipe=False, source=source)


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
    """Open a shard for sequential reading (local file, http(s) stream, or ``pipe:`` command).

    Only a spec starting with ``pipe:`` runs a command; :func:`expand_shards` never produces one from a
    file name, and :func:`shards_from_file` never passes one through from a file.
    """
    if url.startswith(PIPE_PREFIX):
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
