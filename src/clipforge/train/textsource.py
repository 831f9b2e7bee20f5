"""Which caption(s) a training sample gets: ``text_source`` = raw | synthetic | mix:P | multi | rewrites:K.

Captions come from the shard (``KEY.txt`` / ``KEY.json``: *raw*) and from Parquet side tables keyed by
sample key (``caption run`` writes ``caption_synthetic``, ``caption rewrite`` ``caption_rewrites``,
``caption fuse`` ``caption_fused``; any table with a ``key`` column works, a ``shard`` column settles
keys that repeat across shards).

- ``raw``: today's behaviour (the caption picked per epoch from the shard's).
- ``synthetic``: the side-table caption (``text_column``); a key without one keeps its raw caption and is
  counted by key in the run's ``text_source`` report (never skipped: the sample set stays the same).
- ``mix:P``: each time a sample is seen, the synthetic caption with probability P (VeCLIP).
- ``multi``: K = ``multi_positive`` (default 2) positives per image: a raw caption, the synthetic one, then
  rewrites, DreamLIP-style sentences of multi-sentence captions and the other raw captions.
- ``rewrites:K``: uniform among the raw caption and the first K rewrites (LaCLIP).

With ``multi_positive`` K > 1 (e.g. the quickstart recipe's 5), synthetic / mix / rewrites decide the
first of the K positives; the other K - 1 stay the raw captions ``raw`` would give.

Every random choice is seeded by (seed, epoch, key), so a resumed run picks the same captions, and
``mix:0`` equals ``raw``. Optional per-pair weights (``weight_column``, e.g. ALIP-style raw/synthetic
agreement) go to the loss; a key without a weight gets 1.

Side tables are untrusted input: a column of the wrong type or an unreadable file is a ConfigError naming
file and column; a refused value (blank, over-long, non-finite or out-of-range weight, a second different
value for the same key) is left out and counted by reason and key in the report, never a crash mid-run.
"""

from __future__ import annotations

import glob
import logging
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from clipforge.config import ConfigError, did_you_mean

log = logging.getLogger(__name__)

MODES = ("raw", "synthetic", "mix:P", "multi", "rewrites:K")
MISSING_SHOWN = 20  # keys listed per reason in the report (all are counted)
MAX_TEXT_CHARS = 10_000  # as the shards' captions (DecodeConfig.max_caption_chars): longer ones are refused
MAX_WEIGHT = 1e6  # a larger pair weight swamps its batch (and past ~3e38 the float32 loss is inf)
READ_ROWS = 65_536  # rows per Parquet batch read: a big table never sits in memory as Python lists twice


@dataclass(frozen=True)
class TextSource:
    """A parsed ``text_source`` spec."""

    mode: str = "raw"
    p: float = 0.0  # mix:P
    k: int = 0  # rewrites:K

    @classmethod
    def parse(cls, spec: str) -> TextSource:
        name, _, arg = str(spec).strip().partition(":")
        if name in ("raw", "synthetic", "multi"):
            if arg:
                raise ConfigError(f"text_source {spec!r}: {name} takes no argument")
            return cls(name)
        if name == "mix":
            try:
                p = float(arg)
            except ValueError:
                raise ConfigError(
                    f"text_source {spec!r}: give mix:P with P in [0, 1], e.g. mix:0.5"
                ) from None
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"text_source {spec!r}: P must be in [0, 1]")
            return cls("mix", p=p)
        if name == "rewrites":
            if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:  # ("²".isdigit() but int() refuses it)
                raise ConfigError(f"text_source {spec!r}: give rewrites:K with K >= 1, e.g. rewrites:4")
            return cls("rewrites", k=int(arg))
        raise ConfigError(
            f"unknown text_source {spec!r}{did_you_mean(name, [m.split(':')[0] for m in MODES])}: "
            f"use one of {', '.join(MODES)}"
        )

    @property
    def uses_synthetic(self) -> bool:
        return self.mode in ("synthetic", "mix", "multi")

    @property
    def uses_rewrites(self) -> bool:
        return self.mode in ("rewrites", "multi")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """The sentences of a multi-sentence caption (DreamLIP sub-captions); [] for a one-sentence caption."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    parts = [p for p in parts if len(p.split()) >= min_words]
    return parts if len(parts) > 1 else []


# -- side tables ---------------------------------------------------------------------------------


def table_files(specs: list[str]) -> list[Path]:
    """Parquet files of ``text_tables``: files, globs, dirs (their ``*.parquet``, else ``captions/*.parquet``,
    the layout ``caption run`` writes)."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.parquet")) or sorted((p / "captions").glob("*.parquet"))
            if not found:
                raise ConfigError(f"text_tables: no *.parquet in {spec} (nor in {spec}/captions)")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            found = sorted(Path(f) for f in glob.glob(spec))
            if not found:
                raise ConfigError(f"text_tables: {spec} does not exist")
            out += found
    return list(dict.fromkeys(out))


class SideTexts:
    """The side-table columns a run uses, indexed by sample key (and shard, for keys in several shards)."""

    def __init__(
        self,
        rows: dict[str, dict[str, dict[str, Any]]],
        columns: dict[str, str | None],
        bad: dict[str, list[str]],
    ):
        self.rows = rows  # key -> shard ("" when the table has none) -> {role: value}
        self.columns = columns  # role (synthetic / rewrites / weight) -> column name or None
        self.bad = bad  # reason -> keys (values refused while loading)

    def get(self, key: str, shard: str = "") -> dict[str, Any]:
        by_shard = self.rows.get(key)
        if not by_shard:
            return {}
        if len(by_shard) == 1:
            return next(iter(by_shard.values()))
        named = [s for s in by_shard if s]
        row = dict(by_shard.get("", {}))  # rows of tables without a shard column hold for any shard
        if len(named) == 1:
            row.update(by_shard[named[0]])
        else:  # a key in several shards: only its own shard's row
            row.update(by_shard.get(shard, {}))
        return row

    @classmethod
    def load(
        cls,
        specs: list[str],
        source: TextSource,
        text_column: str,
        rewrites_column: str,
        weight_column: str | None,
    ) -> SideTexts:
        """Read the needed columns of every table; a missing column is a ConfigError naming what exists."""
        import pyarrow.parquet as pq

        files = table_files(specs)
        if not files:
            raise ConfigError(
                f"text_source {source.mode} needs text_tables (Parquet side tables keyed by key)"
            )
        schemas: dict[Path, list[str]] = {}
        types: dict[Path, Any] = {}
        for f in files:
            try:
                types[f] = pq.read_schema(str(f))
            except Exception as e:  # an unreadable file is named, not a crash deep in training
                raise ConfigError(f"text_tables: cannot read {f}: {str(e)[:200]}") from None
            schemas[f] = list(types[f].names)
            if "key" not in schemas[f]:
                raise ConfigError(f"text_tables: {f} has no 'key' column (columns: {', '.join(schemas[f])})")
        seen = sorted({c for names in schemas.values() for c in names})
        wanted: dict[str, str | None] = {
            "synthetic": text_column if source.uses_synthetic else None,
            "rewrites": rewrites_column if source.uses_rewrites else None,
            "weight": weight_column or None,
        }
        for role, col in wanted.items():
            if col is None or col in seen:
                continue
            optional = source.mode == "multi" and role in ("synthetic", "rewrites")
            if optional:  # multi uses what the tables have (raw + synthetic and/or rewrites)
                wanted[role] = None
                continue
            flag = {"synthetic": "text_column", "rewrites": "rewrites_column", "weight": "weight_column"}[
                role
            ]
            raise ConfigError(
                f"{flag} {col!r} is in none of the {len(files)} text table(s){did_you_mean(col, seen)}"
            )
        if source.mode == "multi" and not (wanted["synthetic"] or wanted["rewrites"]):
            raise ConfigError(
                f"text_source multi: the tables have neither {text_column!r} nor {rewrites_column!r}"
                f"{did_you_mean(text_column, seen)}"
            )
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        bad: dict[str, list[str]] = {}
        for f in files:
            cols = ["key"] + [c for c in ("shard", *filter(None, wanted.values())) if c in schemas[f]]
            if len(cols) == 1 or (len(cols) == 2 and cols[1] == "shard"):
                continue  # a table with none of the wanted columns (e.g. another stage's)
            cols = list(dict.fromkeys(cols))
            roles = {"key": "key", "shard": "shard", **{c: r for r, c in wanted.items() if c}}
            for col in cols:
                _check_column(f, types[f], col, roles[col])
            start = 0  # row number of the batch's first row in the file
            for table in _batches(f, cols):
                keys, shards = table["key"], table.get("shard") or [""] * len(table["key"])
                for i, key in enumerate(keys):
                    if not isinstance(key, str) or not key.strip():
                        bad.setdefault("bad_key", []).append(f"{f.name}:{start + i}")
                        continue
                    shard = shards[i] if isinstance(shards[i], str) else ""
                    row = rows.setdefault(key, {}).setdefault(shard, {})
                    for role, col in wanted.items():
                        if col is None or col not in table:
                            continue
                        v, why = _clean(role, table[col][i])
                        if why:
                            bad.setdefault(f"{why}_{role}", []).append(key)
                        if v is None:
                            continue
                        # a key twice (same shard) with different values: the first row's stays, counted
                        if role in row and row[role] != v:
                            bad.setdefault(f"conflict_{role}", []).append(key)
                            continue
                        row[role] = v
                start += len(keys)
        for why, ks in bad.items():
            log.warning("text_tables: %d values refused (%s), e.g. %s", len(ks), why, ", ".join(ks[:3]))
        return cls(rows, wanted, bad)

    def coverage(self, samples: list[tuple[str, str]], source: TextSource) -> dict[str, Any]:
        """What the tables give the run's samples ((shard, key) pairs): counts, and missing keys by reason."""
        roles = [r for r, c in self.columns.items() if c]
        have = dict.fromkeys(roles, 0)
        missing: dict[str, list[str]] = {r: [] for r in roles}
        used: set[str] = set()
        for shard, key in samples:
            row = self.get(key, shard)
            if key in self.rows:  # in the tables, even if all its values were refused
                used.add(key)
            for r in roles:
                if r in row:
                    have[r] += 1
                else:
                    missing[r].append(key)
        out: dict[str, Any] = {
            "text_source": source.mode
            + (f":{source.p:g}" if source.mode == "mix" else "")
            + (f":{source.k}" if source.mode == "rewrites" else ""),
            "columns": {r: c for r, c in self.columns.items() if c},
            "samples": len(samples),
            "with": have,
            "missing": {r: len(v) for r, v in missing.items()},
            "missing_keys": {r: v[:MISSING_SHOWN] for r, v in missing.items() if v},
            "table_keys_unused": len(unused := [k for k in self.rows if k not in used]),
            "unused_keys": unused[:MISSING_SHOWN],
            "refused_values": {r: len(v) for r, v in self.bad.items()},
            "refused_keys": {r: v[:MISSING_SHOWN] for r, v in self.bad.items()},
        }
        if source.uses_synthetic and "synthetic" in roles:
            out["fallback"] = "a sample without a synthetic caption keeps its raw caption"
        return out


def _check_column(f: Path, schema: Any, col: str, role: str) -> None:
    """A column of the wrong type (or named twice) is a ConfigError: Parquet types are per column, so
    every value of it would be refused and the run would silently train on raw captions / weights 1."""
    import pyarrow as pa

    if len(schema.get_all_field_indices(col)) > 1:
        raise ConfigError(f"text_tables: {f} has more than one column {col!r}")
    t = schema.field(col).type
    if pa.types.is_null(t):  # all values null (e.g. an all-None pandas column): every key misses it
        return
    if role == "rewrites":
        lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        ok = lists and _is_text(t.value_type)
        want = "a list of strings"
    elif role == "weight":
        ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        want = "numbers"
    else:
        ok, want = _is_text(t), "strings"
    if not ok:
        raise ConfigError(f"text_tables: {f} column {col!r} ({role}) holds {t}, not {want}")


def _is_text(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):  # pandas categoricals
        t = t.value_type
    return pa.types.is_null(t) or str(t) in ("string", "large_string", "string_view")


def _batches(f: Path, cols: list[str]) -> Iterator[dict[str, list]]:
    """A table's columns, READ_ROWS rows at a time; corrupt data pages are a ConfigError naming the file
    (the schema read only checks the footer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(str(f)).iter_batches(batch_size=READ_ROWS, columns=cols):
            yield batch.to_pydict()
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        raise ConfigError(f"text_tables: cannot read {f}: {str(e)[:200]}") from None


def _clean(role: str, v: Any) -> tuple[Any, str | None]:
    """A table value as the run uses it (None: missing or refused) and why (part of) it was refused:
    ``bad`` (blank, wrong, out of range) or ``too_long`` (over MAX_TEXT_CHARS, as shard captions)."""
    if v is None:
        return None, None
    if role == "synthetic":
        text = v.strip() if isinstance(v, str) else ""
        if len(text) > MAX_TEXT_CHARS:
            return None, "too_long"
        return (text, None) if text else (None, "bad")
    if role == "rewrites":
        if not isinstance(v, list):
            return None, "bad"
        texts = [r.strip() if isinstance(r, str) else "" for r in v]
        kept = [t for t in texts if 0 < len(t) <= MAX_TEXT_CHARS]
        why = None
        if len(kept) < len(texts):  # a null / blank / over-long rewrite is counted, the others kept
            why = "too_long" if any(len(t) > MAX_TEXT_CHARS for t in texts) else "bad"
        return list(dict.fromkeys(kept)) or None, why
    if isinstance(v, Decimal):
        v = float(v)
    # weights: numbers, finite, >= 0 (a negative one would push a positive pair apart), <= MAX_WEIGHT
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None, "bad"
    return (float(v), None) if 0 <= v <= MAX_WEIGHT else (None, "bad")


# -- the choice ----------------------------------------------------------------------------------


class TextChooser:
    """Per-sample caption choice of a text source (picklable: DataLoader workers hold a copy)."""

    def __init__(self, source: TextSource, side: SideTexts | None, k: int, seed: int, splits: bool = True):
        self.source, self.side, self.k, self.seed, self.splits = source, side, k, seed, splits

    @property
    def weighted(self) -> bool:
        return self.side is not None and bool(self.side.columns.get("weight"))

    def _row(self, key: str, shard: str) -> dict[str, Any]:
        return self.side.get(key, shard) if self.side is not None else {}

    def weight(self, key: str, shard: str = "") -> float:
        return float(self._row(key, shard).get("weight", 1.0))

    def choose(
        self, raw_picked: list[str], raw_all: list[str], key: str, shard: str, epoch: int
    ) -> list[str]:
        """The ``k`` texts of a sample this epoch. ``raw_picked``: what ``raw`` would give (its k captions)."""
        mode = self.source.mode
        if mode == "raw":
            return raw_picked
        row = self._row(key, shard)
        syn = row.get("synthetic")
        rng = random.Random(f"text:{self.seed}:{epoch}:{key}")
        if mode == "synthetic":
            return [syn, *raw_picked[1:]] if syn else raw_picked
        if mode == "mix":
            return [syn, *raw_picked[1:]] if syn and rng.random() < self.source.p else raw_picked
        if mode == "rewrites":
            options = [raw_picked[0], *row.get("rewrites", [])[: self.source.k]]
            return [options[rng.randrange(len(options))], *raw_picked[1:]]
        # multi: a raw caption, the synthetic one, then the rest (rewrites, sentences, other raws) shuffled;
        # a synthetic caption equal to the raw one is not a second positive while other texts exist
        first = list(dict.fromkeys([raw_picked[0]] + ([syn] if syn else [])))
        rest = [t for t in self.extras(raw_all, row) if t not in first]
        rest = list(dict.fromkeys(rest))
        rng.shuffle(rest)
        texts = (first + rest)[: self.k]
        return [texts[j % len(texts)] for j in range(self.k)]

    def extras(self, raw_all: list[str], row: dict[str, Any]) -> list[str]:
        """multi's texts after the raw and synthetic ones."""
        syn = row.get("synthetic")
        out = list(row.get("rewrites", []))
        if self.splits:
            for t in [*raw_all, *([syn] if syn else [])]:
                out += split_sentences(t)
        return out + list(raw_all)

    def pool(self, raw_all: list[str], key: str, shard: str) -> list[str]:
        """Every text this sample can get (the feature cache encodes each distinct one once)."""
        if self.source.mode == "raw":
            return list(raw_all)
        row = self._row(key, shard)
        out = list(raw_all) + ([row["synthetic"]] if row.get("synthetic") else [])
        if self.source.mode == "rewrites":
            out += row.get("rewrites", [])[: self.source.k]
        elif self.source.mode == "multi":
            out += self.extras(raw_all, row)
        return list(dict.fromkeys(out))


def build_chooser(cfg: Any, k: int) -> tuple[TextChooser, SideTexts | None]:
    """The run's chooser from a TrainConfig (tables read once, in the main process)."""
    source = TextSource.parse(cfg.text_source)
    side = None
    if source.mode != "raw" or cfg.weight_column:
        side = SideTexts.load(
            cfg.text_tables, source, cfg.text_column, cfg.rewrites_column, cfg.weight_column
        )
    return TextChooser(source, side, k, cfg.seed, cfg.text_splits), side
