"""Small shared helpers: atomic writes, JSON/table output for commands, torch thread setup."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in the same directory; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def emit_json(obj: Any) -> None:
    """The ``--json`` contract: exactly one JSON object on stdout (logs go to stderr)."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def format_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """Plain aligned text table (floats with 4 decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[fmt(v) for v in r] for r in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(headers)
    ]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep, *("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body)])


def setup_torch_threads(threads: int | None = None) -> int:
    """Intra-op threads sized to the CPUs really available (see :mod:`clipforge.runtime`)."""
    from clipforge.runtime import setup_process

    return setup_process(threads)


DEFAULT_ROOT = Path("runs")  # every command's default outputs land under here (git-ignored)


def default_output(name: str) -> Path:
    """``runs/NAME``: the one default root for outputs a user did not place."""
    return DEFAULT_ROOT / name


class OutputExistsError(FileExistsError):
    """An output dir already holds a previous result (mixing runs would corrupt both)."""


def prepare_output_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """The rule for every command that writes shards/tables into a dir.

    - missing or empty dir: created;
    - non-empty and ``resume``: kept (the command checks its saved config and continues);
    - non-empty and ``overwrite``: the old contents are moved aside and deleted only after the
      rename (never a half-deleted dir);
    - non-empty otherwise: :class:`OutputExistsError` naming both ways out.
    Stale ``*.tmp`` files from a killed run are removed in every case.
    """
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if overwrite:
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        elif not resume:
            raise OutputExistsError(
                f"{path} already holds a previous result; pass --overwrite to replace it "
                "(or --resume where the command supports it), or choose another --output"
            )
    path.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    return path


def clean_stale_tmp(path: str | Path, min_age_s: float = 0.0) -> int:
    """Delete ``*.tmp`` files/dirs left in ``path`` (recursively) by a killed writer; returns the count.

    ``min_age_s`` spares temp files younger than that: a dir shared by live runs (a feature cache) must
    not lose a neighbour's file being written.
    """
    import shutil
    import time

    n = 0
    now = time.time()
    for p in Path(path).rglob("*.tmp"):
        try:
            if min_age_s and now - p.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
