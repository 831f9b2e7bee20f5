"""A built index directory opened for search: faiss + metadata + thumbnails, with column filters.

Unfiltered queries go to the faiss index (batched: one call for many queries). Filtered queries
(``{"label": 3}``, ``{"shard": ["a.tar", "b.tar"]}``) search exactly over the matching rows when
there are at most ``exact_filter_limit`` of them (a float16 matmul over the subset: exact and fast),
otherwise they over-fetch from faiss and keep the matching hits.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.index import ann
from clipforge.index.build import read_manifest, truncate

log = logging.getLogger(__name__)

Filters = dict[str, Any]


@dataclass
class Hit:
    row: int
    score: float


class FilterError(ValueError):
    """A filter names an unknown column or has an unusable value (the server answers 400)."""


def filter_signature(filters: Filters | None) -> str:
    import json

    return json.dumps(filters or {}, sort_keys=True, default=str)


class ClipIndex:
    """Open with :meth:`load`; thread-safe for concurrent searches."""

    def __init__(self, directory: str | Path, mmap: bool = True, exact_filter_limit: int = 200_000) -> None:
        import faiss
        import pyarrow.parquet as pq

        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        self.count = int(self.manifest["count"])
        self.dim = int(self.manifest["dim"])
        self.embed_dim = int(self.manifest["embed_dim"])
        self.embeddings = np.load(self.dir / "embeddings.npy", mmap_mode="r" if mmap else None)
        self.meta = pq.read_table(self.dir / "meta.parquet")
        if len(self.meta) != self.count or len(self.embeddings) != self.count:
            raise ValueError(f"{self.dir}: manifest count {self.count} disagrees with the stored tables")
        self.index = faiss.read_index(str(self.dir / "index.faiss"))
        params = self.manifest["index"].get("params") or {}
        if params:
            ann.set_params(self.index, params)
        self.exact_filter_limit = exact_filter_limit
        self._uid_row = {u: i for i, u in enumerate(self.meta.column("uid").to_pylist())}
        self._thumbs: Any = None
        self._thumb_lock = threading.Lock()
        self._mask_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._mask_lock = threading.Lock()

    @classmethod
    def load(cls, directory: str | Path, **kw: Any) -> ClipIndex:
        return cls(directory, **kw)

    @property
    def model_ref(self) -> str:
        return self.manifest["model"]

    @property
    def columns(self) -> list[str]:
        return list(self.meta.column_names)

    def describe(self) -> dict[str, Any]:
        ix = self.manifest["index"]
        return {
            "path": str(self.dir),
            "count": self.count,
            "dim": self.dim,
            "embed_dim": self.embed_dim,
            "type": ix["kind"],
            "factory": ix["factory"],
            "model": self.model_ref,
        }

    # -- filters ------------------------------------------------------------------------------
    def filter_rows(self, filters: Filters) -> np.ndarray:
        """Row ids matching every ``column: value`` (a list value means any of them). Cached per filter."""
        import pyarrow as pa
        import pyarrow.compute as pc

        sig = filter_signature(filters)
        with self._mask_lock:
            if sig in self._mask_cache:
                self._mask_cache.move_to_end(sig)
                return self._mask_cache[sig]
        mask = None
        for col, want in filters.items():
            if col not in self.meta.column_names or col in ("captions",):
                raise FilterError(f"unknown filter column {col!r}; filterable: {self.filterable_columns()}")
            values = want if isinstance(want, list) else [want]
            if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
                raise FilterError(f"filter {col!r} needs a scalar or a non-empty list of scalars")
            column = self.meta.column(col)
            try:
                arr = pa.array(values).cast(column.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise FilterError(
                    f"filter {col!r}: values {values!r} do not match column type {column.type}"
                ) from None
            m = pc.is_in(column, value_set=arr).to_numpy(zero_copy_only=False)
            mask = m if mask is None else mask & m
        rows = np.flatnonzero(mask) if mask is not None else np.arange(self.count)
        with self._mask_lock:
            self._mask_cache[sig] = rows
            while len(self._mask_cache) > 64:
                self._mask_cache.popitem(last=False)
        return rows

    def filterable_columns(self) -> list[str]:
        return [c for c in self.meta.column_names if c != "captions"]

    # -- search -------------------------------------------------------------------------------
    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Model embeddings [B, embed_dim] -> index space (truncated to ``dim``, unit rows)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.embed_dim:
            raise ValueError(f"query dim {q.shape[1]} != index's model dim {self.embed_dim}")
        return truncate(q, self.dim)

    def search(self, queries: np.ndarray, k: int = 10, filters: Filters | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query (fewer when the index or the filtered subset is smaller)."""
        q = self.prepare(queries)
        k = int(k)
        if k < 1:
            raise ValueError("k must be >= 1")
        if filters:
            rows = self.filter_rows(filters)
            if len(rows) <= self.exact_filter_limit:
                return self._search_subset(q, k, rows)
            return self._search_overfetch(q, k, rows)
        kk = min(k, self.count)
        scores, ids = self.index.search(q, kk)
        return [[Hit(int(i), float(s)) for i, s in zip(ir, sr) if i >= 0] for ir, sr in zip(ids, scores)]

    def _search_subset(self, q: np.ndarray, k: int, rows: np.ndarray) -> list[list[Hit]]:
        if len(rows) == 0:
            return [[] for _ in range(len(q))]
        sub = truncate(np.asarray(self.embeddings[rows], dtype=np.float32), self.dim)
        sims = q @ sub.T
        kk = min(k, len(rows))
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        out = []
        for i in range(len(q)):
            order = top[i][np.argsort(-sims[i, top[i]])]
            out.append([Hit(int(rows[j]), float(sims[i, j])) for j in order])
        return out

    def _search_overfetch(self, q: np.ndarray, k: int, rows: np.ndarray) -> list[list[Hit]]:
        """Fetch more than k from faiss and keep allowed rows; widen until k found or all rows seen."""
        allowed = np.zeros(self.count, dtype=bool)
        allowed[rows] = True
        want = min(k, len(rows))
        fetch = min(self.count, max(k * 4, int(k * self.count / max(1, len(rows)) * 2)))
        out: list[list[Hit]] = [[] for _ in range(len(q))]
        todo = np.arange(len(q))
        while len(todo):
            scores, ids = self.index.search(q[todo], fetch)
            left = []
            for qi, ir, sr in zip(todo, ids, scores):
                got = [Hit(int(i), float(s)) for i, s in zip(ir, sr) if i >= 0 and allowed[i]][:k]
                out[qi] = got
                if len(got) < want and fetch < self.count:
                    left.append(qi)
            todo = np.asarray(left, dtype=np.int64)
            fetch = min(self.count, fetch * 4)
        return out

    # -- rows and thumbnails ------------------------------------------------------------------
    def rows(self, ids: list[int], columns: list[str] | None = None) -> list[dict[str, Any]]:
        t = self.meta if columns is None else self.meta.select(columns)
        return t.take(np.asarray(ids, dtype=np.int64)).to_pylist() if ids else []

    def results(self, hits: list[Hit]) -> list[dict[str, Any]]:
        """Hits -> result dicts: rank, score and the row's metadata (no thumbnail bytes)."""
        rows = self.rows([h.row for h in hits])
        return [{"rank": r + 1, "score": h.score, **row} for r, (h, row) in enumerate(zip(hits, rows))]

    def row_of(self, uid: str) -> int | None:
        return self._uid_row.get(uid)

    def thumbnail(self, uid: str) -> bytes | None:
        """JPEG thumbnail bytes of an indexed image, or None for an unknown key."""
        import pyarrow.parquet as pq

        row = self._uid_row.get(uid)
        if row is None:
            return None
        with self._thumb_lock:
            if self._thumbs is None:
                self._thumbs = pq.read_table(self.dir / "thumbs.parquet", memory_map=True).column("thumb")
        data = self._thumbs[row].as_py()
        return data or None
