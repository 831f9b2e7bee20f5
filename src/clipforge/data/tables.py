"""Rows of an untrusted CSV / TSV / Parquet / JSONL table, where one bad row costs one row (issue 11.10).

:func:`read_table_rows` yields a dict per row, or a :class:`BadRow` in its place (so row numbers, which
become sample keys, stay stable) when the row cannot be read:

- ``row_too_large``: a cell over ``max_cell_chars`` (Python's csv limit, 131,072 by default, used to
  end the whole ingest with a traceback) or a physical line over ``max_line_chars`` (never held whole);
- ``not_utf8``: bytes that are not UTF-8 (the rest of the file is still read);
- ``bad_row``: not JSON / not a JSON object / a CSV row with more non-empty fields than the header;
- ``table_damaged``: a Parquet file that fails mid-way (the rows before it are kept).
Blank lines are not rows. A UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TABLE_EXTS = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson")
DEFAULT_MAX_CELL_CHARS = 1 << 20
_BOM = "\ufeff"


@dataclass
class BadRow:
    reason: str
    detail: str = ""


class _LineTooLong(Exception):
    pass


class _Lines:
    """Physical lines of a text file, each at most ``limit`` chars: a longer one is skipped in chunks
    (never held whole) and raises _LineTooLong once; iteration goes on after it."""

    def __init__(self, f: IO[str], limit: int) -> None:
        self.f, self.limit = f, limit

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.f.readline(self.limit + 1)
        if not line:
            raise StopIteration
        if len(line) > self.limit and not line.endswith("\n"):
            skipped = len(line)
            while (chunk := self.f.readline(self.limit + 1)) and not chunk.endswith("\n"):
                skipped += len(chunk)
            raise _LineTooLong(f"line of more than {skipped + len(chunk)} chars > {self.limit}")
        return line


def _is_utf8(cells: list[str]) -> bool:
    try:
        "".join(cells).encode("utf-8")  # surrogate escapes (undecodable bytes) fail here
        return True
    except UnicodeEncodeError:
        return False


def _csv_rows(path: Path, delimiter: str, max_cell: int, max_line: int) -> Iterator[dict[str, Any] | BadRow]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(max_cell)
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(_Lines(f, max_line), delimiter=delimiter)
            header: list[str] | None = None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except (csv.Error, _LineTooLong) as e:
                    if header is None:
                        raise ValueError(f"{path}: unreadable header: {e}") from None
                    yield BadRow("row_too_large", str(e)[:200])
                    continue
                if not row:
                    continue  # blank line
                if header is None:
                    if not _is_utf8(row):
                        raise ValueError(f"{path}: header is not UTF-8")
                    header = [row[0].lstrip(_BOM), *row[1:]]
                    continue
                if not _is_utf8(row):
                    yield BadRow("not_utf8", f"line {reader.line_num}")
                    continue
                if len(row) > len(header) and any(c.strip() for c in row[len(header) :]):
                    yield BadRow(
                        "bad_row", f"line {reader.line_num}: {len(row)} fields, header has {len(header)}"
                    )
                    continue
                yield {h: (row[j] if j < len(row) else None) for j, h in enumerate(header)}
    finally:
        csv.field_size_limit(old_limit)


def _jsonl_rows(path: Path, max_line: int) -> Iterator[dict[str, Any] | BadRow]:
    with open(path, "rb") as f:
        n = 0
        while True:
            line = f.readline(max_line + 1)
            if not line:
                return
            n += 1
            if len(line) > max_line and not line.endswith(b"\n"):
                while (chunk := f.readline(max_line + 1)) and not chunk.endswith(b"\n"):
                    pass
                yield BadRow("row_too_large", f"line {n}: longer than {max_line} bytes")
                continue
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow("not_utf8", f"line {n}: {e}"[:200])
                continue
            try:
                row = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                yield BadRow("bad_row", f"line {n}: not JSON: {e}"[:200])
                continue
            if not isinstance(row, dict):
                yield BadRow("bad_row", f"line {n}: not a JSON object")
                continue
            yield row


def _parquet_rows(path: Path) -> Iterator[dict[str, Any] | BadRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)  # a file that is not Parquet at all fails here, before any row: a clear error
    try:
        for batch in pf.iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    except Exception as e:  # corrupt page or column chunk mid-file
        yield BadRow("table_damaged", f"{type(e).__name__}: {str(e)[:200]} (rows after this are lost)")


def read_table_rows(
    path: str | Path, *, max_cell_chars: int = DEFAULT_MAX_CELL_CHARS, max_line_chars: int | None = None
) -> Iterator[dict[str, Any] | BadRow]:
    """Rows of a CSV / TSV / Parquet / JSONL file as dicts, a :class:`BadRow` in place of each bad one.

    ``max_line_chars`` defaults to 4 x ``max_cell_chars`` (a row may hold a few big cells).
    """
    path = Path(path)
    ext = path.suffix.lower()
    max_line = max_line_chars or 4 * max_cell_chars
    if ext in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if ext == ".tsv" else ",", max_cell_chars, max_line)
    elif ext == ".parquet":
        yield from _parquet_rows(path)
    elif ext in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path, max_line)
    else:
        raise ValueError(f"unsupported table format {ext!r} (use one of {', '.join(TABLE_EXTS)})")
