"""Write img2dataset-style webdataset shards (KEY.jpg + KEY.txt + KEY.json [+ KEY.cls]) and their side table.

Each shard is written to a hidden temp file in the output directory and renamed into place only when it
is complete, so a reader never sees a half-written shard and a crash leaves no corrupt ``.tar`` behind.

Side table layout (chosen so it is as crash-safe as the shards): ONE Parquet file PER SHARD, beside it,
with the same stem: ``OUT/shard-000000.tar`` + ``OUT/shard-000000.parquet`` (img2dataset does the same).
The Parquet file is finalized *before* its shard is renamed, so every visible shard has its table.
Columns: ``key, shard, caption, width, height, sha256`` (of the stored image bytes), ``source`` (input
path/URL), plus any ``__side__`` columns a caller adds. Later stages (curate, caption) extend the table
by key with :func:`add_columns`; :func:`read_side_table` returns the whole set as one Arrow table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from clipforge.data.decode import IMAGE_EXTS
from clipforge.data.keys import printable, unsafe_key_reason
from clipforge.utils import atomic_path

BASE_COLUMNS = ("key", "shard", "caption", "width", "height", "sha256", "source")
_BASE_TYPES = {
    "key": pa.string(),
    "shard": pa.string(),
    "caption": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "sha256": pa.string(),
    "source": pa.string(),
}


def _encode(value: Any) -> bytes:
    """Member payload: bytes as-is, str as UTF-8, dict/list as JSON, int (KEY.cls) as text."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("utf-8")
    raise TypeError(f"cannot store {type(value).__name__} in a shard")


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width/height from the image header only (no decode); None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None, None


class ShardWriter:
    """Stream samples into size/count-limited shards with atomic finalize and per-shard side tables.

    ``pattern`` is a path with a ``%d``-style field (``out/train-%06d.tar``); or give ``output_dir`` and
    ``prefix`` (-> ``output_dir/prefix-%06d.tar``). A sample is a dict ``{"__key__": str, ext: payload}``
    with optional ``__source__`` (side-table source), ``__width__``/``__height__`` (else read from the
    image header) and ``__side__`` (extra side-table columns).
    """

    def __init__(
        self,
        pattern: str | Path | None = None,
        *,
        output_dir: str | Path | None = None,
        prefix: str = "shard",
        maxcount: int = 10_000,
        maxsize: float = 1e9,
        start_shard: int = 0,
        side_table: bool = True,
    ) -> None:
        if pattern is None:
            if output_dir is None:
                raise ValueError("give a shard pattern (out/shard-%06d.tar) or output_dir (+ prefix)")
            pattern = os.path.join(str(output_dir), f"{prefix}-%06d.tar")
        pattern = str(pattern)
        try:
            pattern % 0
        except TypeError:
            raise ValueError(
                f"shard pattern needs one %d field, e.g. out/shard-%06d.tar: {pattern}"
            ) from None
        if maxcount < 1 or maxsize <= 0:
            raise ValueError("maxcount must be >= 1 and maxsize > 0")
        self.pattern, self.maxcount, self.maxsize = pattern, maxcount, maxsize
        self.side_table = side_table
        self.shard_index = start_shard
        self.shards: list[str] = []  # finalized shard paths
        self.total = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: str | None = None
        self._count = 0
        self._size = 0
        self._rows: list[dict[str, Any]] = []
        Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)

    # -- shard lifecycle -------------------------------------------------------------------------
    @property
    def current_path(self) -> str:
        return self.pattern % self.shard_index

    def _open(self) -> None:
        final = self.current_path
        fd, self._tmp = tempfile.mkstemp(
            prefix=f".{Path(final).name}.", suffix=".tmp", dir=Path(final).parent
        )
        self._tar = tarfile.open(fileobj=os.fdopen(fd, "wb"), mode="w", format=tarfile.GNU_FORMAT)
        self._count, self._size, self._rows = 0, 0, []

    def _finalize(self) -> None:
        """Close the current shard: write its side table, then rename the temp tar into place."""
        if self._tar is None:
            return
        final = self.current_path
        fileobj = self._tar.fileobj
        self._tar.close()
        fileobj.close()  # type: ignore[union-attr]
        if self.side_table:
            write_table(Path(final).with_suffix(".parquet"), self._rows)
        os.chmod(self._tmp, 0o644)  # type: ignore[arg-type]  # mkstemp makes 0600: shards are shared data
        os.replace(self._tmp, final)  # type: ignore[arg-type]
        self.shards.append(final)
        self._tar, self._tmp = None, None
        self.shard_index += 1

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: byte-identical reruns
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    # -- public API ------------------------------------------------------------------------------
    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample; starts a new shard first if this one would exceed maxcount/maxsize."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in Path(key).name:
            raise ValueError(f"sample key must be a non-empty string without dots: {key!r}")
        why = unsafe_key_reason(key)
        if why is not None:  # shards are extracted with tar -x downstream: never write a traversal
            raise ValueError(f"unsafe key {printable(key)!r}: {why}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}")
        members = {k: _encode(v) for k, v in sample.items() if not k.startswith("__") and v is not None}
        if not members:
            raise ValueError(f"sample {key!r} has no payload")
        nbytes = sum(len(v) + 1024 for v in members.values())  # + tar header and padding, roughly
        if self._tar is not None and (self._count >= self.maxcount or self._size + nbytes > self.maxsize):
            self._finalize()
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            self._add_member(f"{key}.{ext}", data)
        self._keys.add(key)
        self._count += 1
        self._size += nbytes
        self.total += 1
        if self.side_table:
            self._rows.append(self._side_row(key, sample, members))

    def _side_row(self, key: str, sample: dict[str, Any], members: dict[str, bytes]) -> dict[str, Any]:
        img = next((members[e] for e in IMAGE_EXTS if e in members), None)
        w, h = sample.get("__width__"), sample.get("__height__")
        if img is not None and (w is None or h is None):
            w, h = _image_size(img)
        txt = members.get("txt")
        row = {
            "key": key,
            "shard": Path(self.current_path).name,
            "caption": txt.decode("utf-8", "replace") if txt is not None else None,
            "width": w,
            "height": h,
            "sha256": hashlib.sha256(img).hexdigest() if img is not None else None,
            "source": sample.get("__source__"),
        }
        row.update(sample.get("__side__") or {})
        return row

    def close(self) -> list[str]:
        """Finalize the last shard; returns all shard paths written."""
        self._finalize()
        return self.shards

    def abort(self) -> None:
        """Drop the unfinished shard (its temp file); finalized shards stay."""
        if self._tar is not None:
            fileobj = self._tar.fileobj
            try:
                self._tar.close()
                fileobj.close()  # type: ignore[union-attr]
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.unlink(self._tmp)
                self._tar, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- side tables -------------------------------------------------------------------------------------
def write_table(path: str | Path, rows: list[dict[str, Any]] | pa.Table) -> None:
    """Atomically write rows (base columns typed, extras inferred) as Parquet."""
    if isinstance(rows, pa.Table):
        table = rows
    else:
        names = list(dict.fromkeys([*BASE_COLUMNS, *(c for r in rows for c in r)]))
        table = pa.table({c: pa.array([r.get(c) for r in rows], type=_BASE_TYPES.get(c)) for c in names})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)


def side_table_paths(directory: str | Path) -> list[Path]:
    """Per-shard Parquet files of a shard directory (only those whose ``.tar`` exists), sorted."""
    d = Path(directory)
    return [p for p in sorted(d.glob("*.parquet")) if p.with_suffix(".tar").exists()]


def read_side_table(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole shard set's side table as one Arrow table (rows in shard, then sample order)."""
    paths = side_table_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no side tables (SHARD.parquet beside SHARD.tar) in {directory}")
    tables = [pq.read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables, promote_options="default")


def add_columns(directory: str | Path, table: pa.Table | dict[str, list], overwrite: bool = False) -> int:
    """Join new columns into every per-shard side table by ``key``; returns how many keys matched.

    Rows without a value get nulls. Raises if a column exists (unless ``overwrite``), if ``table`` has
    duplicate keys, or if some of its keys match no sample (so a key mix-up never goes unnoticed).
    """
    if isinstance(table, dict):
        table = pa.table(table)
    if "key" not in table.column_names:
        raise ValueError("table must have a 'key' column")
    new_cols = [c for c in table.column_names if c != "key"]
    if not new_cols:
        raise ValueError("table has no columns besides 'key'")
    keys = table.column("key").cast(pa.string())
    if pc.count_distinct(keys).as_py() != len(keys):
        raise ValueError("duplicate keys in the table to add")
    paths = side_table_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no side tables in {directory}")
    olds = [pq.read_table(p) for p in paths]
    for c in new_cols:
        if c in BASE_COLUMNS or (not overwrite and any(c in t.column_names for t in olds)):
            raise ValueError(
                f"column {c!r} already exists (pass overwrite=True to replace a non-base column)"
            )
    matched = 0
    updated = []
    for old in olds:
        idx = pc.index_in(old.column("key"), value_set=keys)
        matched += len(idx) - idx.null_count
        for c in new_cols:
            col = table.column(c).take(idx)
            if c in old.column_names:
                old = old.set_column(old.column_names.index(c), c, col)
            else:
                old = old.append_column(c, col)
        updated.append(old)
    if matched != len(keys):
        raise KeyError(f"{len(keys) - matched} of {len(keys)} keys match no sample in {directory}")
    for p, t in zip(paths, updated):
        write_table(p, t)
    return matched
