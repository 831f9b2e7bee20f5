"""Apply filters to a scored shard set: a keep-list of keys and a reshard of only the kept samples.

Nothing is rescored: the mask comes from ``OUT/scores.parquet`` and the kept samples are copied
byte-for-byte (every member: image, txt, json, cls...) from the input shards with the data layer's
ShardWriter (atomic shards + per-shard side tables), so the curated set is a normal shard set.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.filter import apply_filters
from clipforge.curate.outputs import prepare_output
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import shards_from_file
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)

# Score columns copied into the resharded side tables (small scalars only).
SIDE_COLUMNS = ("clip_score", "caption_words", "lang", "is_duplicate", "concepts")


def load_run(scores_dir: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """``DIR/scores.parquet`` and ``DIR/manifest.json``, the manifest's shard list sanitized.

    Both are required and checked here, so a missing, truncated or hand-edited file is one error line
    naming it (not an Arrow, JSON or ``KeyError`` message from deep inside a command): the table must
    have a text ``key`` column, the manifest an object with a ``urls`` list. A finished ``curate run``
    writes both (``manifest.json`` last). A manifest is data, not a command line: its ``urls`` go
    through :func:`clipforge.data.shards.shards_from_file`, so a ``pipe:`` entry is refused, never run.
    """
    d = Path(scores_dir)
    scores, mpath = d / "scores.parquet", d / "manifest.json"
    for p in (scores, mpath):
        if not p.is_file():
            what = "is not a file" if p.exists() else "not found"
            raise FileNotFoundError(
                f"{p} {what}: run `clipforge curate run --output {d}` to the end first "
                "(a finished run writes scores.parquet and manifest.json)"
            )
    try:
        table = pq.read_table(scores)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"{scores} is not a readable Parquet table ({_one_line(e)}): rerun curate run"
        ) from None
    key = table.schema.field("key").type if "key" in table.column_names else None
    if key is None or not (pa.types.is_string(key) or pa.types.is_large_string(key)):
        got = "no such column" if key is None else str(key)
        raise ValueError(f"{scores} needs a text 'key' column ({got}): is it a `curate run` score table?")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{mpath} is not readable JSON: {_one_line(e)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("urls"), list):
        got = type(manifest.get("urls") if isinstance(manifest, dict) else manifest).__name__
        raise ValueError(f"{mpath} must be an object with a 'urls' list of input shards, got {got}")
    manifest["urls"] = shards_from_file(manifest["urls"], source=str(mpath), expand=False)
    return table, manifest


def _one_line(e: BaseException, n: int = 200) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def filter_run(
    scores_dir: str | Path,
    expressions: list[str],
    output: str | Path,
    *,
    reshard: bool = True,
    maxcount: int = 10_000,
    prefix: str = "curated",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Mask -> ``OUTPUT/keep.txt`` (+ ``filter.json`` counts) and, with ``reshard``, kept-sample shards.

    ``OUTPUT`` must be new or empty, or ``overwrite`` replaces it (never a mix of two filter runs);
    the expressions are checked before anything there is touched.
    """
    from tqdm import tqdm

    from clipforge.data.writer import ShardWriter

    if maxcount < 1:
        raise ValueError(f"--maxcount must be >= 1, got {maxcount}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", prefix):
        raise ValueError(
            f"--prefix must be a plain file-name part (letters, digits, _ . -), got {prefix[:100]!r}"
        )
    table, manifest = load_run(scores_dir)
    mask, counts = apply_filters(table, expressions)
    keys = table.column("key").to_pylist()
    kept = [k for k, m in zip(keys, mask) if m and k is not None]
    null_keys = int(sum(1 for k, m in zip(keys, mask) if m and k is None))  # no key: nothing to list
    if reshard and kept and not manifest["urls"]:  # before OUTPUT is touched
        raise FileNotFoundError(f"{scores_dir}/manifest.json lists no input shards to reshard from")
    inputs = [Path(scores_dir) / "scores.parquet", *manifest["urls"]]
    out = prepare_output(output, overwrite=overwrite, inputs=inputs)
    with atomic_path(out / "keep.txt") as tmp:
        tmp.write_text("".join(k + "\n" for k in kept))
    summary: dict[str, Any] = {
        "scores": str(scores_dir),
        "output": str(out),
        "rows": table.num_rows,
        "kept": len(kept),
        "kept_frac": len(kept) / table.num_rows if table.num_rows else 0.0,
        "filters": counts,
        "skipped_null_key": null_keys,
        "shards": [],
    }
    if null_keys:
        log.warning("%d kept rows have no key and are skipped (see skipped_null_key)", null_keys)
    if reshard and kept:
        urls = manifest["urls"]
        keep = set(kept)
        side = {
            c: dict(zip(keys, table.column(c).to_pylist())) for c in SIDE_COLUMNS if c in table.column_names
        }
        report = BadSampleReport()
        written = 0
        with ShardWriter(output_dir=out, prefix=prefix, maxcount=maxcount) as writer:
            for url in tqdm(urls, desc="reshard", unit="shard", disable=not progress):
                for s in iter_tar_samples(url, report):
                    if s["__key__"] not in keep:
                        continue
                    sample = {k: v for k, v in s.items() if not k.startswith("__")}
                    sample["__key__"] = s["__key__"]
                    sample["__source__"] = url
                    sample["__side__"] = {c: side[c][s["__key__"]] for c in side}
                    writer.write(sample)
                    written += 1
        summary["shards"] = writer.shards
        summary["written"] = written
        summary["not_written"] = max(0, len(kept) - written)
        summary["bad_samples"] = report.to_dict()["counts"]
        if written != len(kept):  # a shard changed or got damaged since scoring: say so, loudly
            log.warning("kept %d keys but wrote %d samples (see bad_samples)", len(kept), written)
    mask_frac = float(np.mean(mask)) if len(mask) else 0.0
    summary["kept_frac"] = mask_frac
    write_json(out / "filter.json", summary)
    return summary
