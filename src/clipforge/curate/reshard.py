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


def load_run(scores_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """``DIR/scores.parquet`` and ``DIR/manifest.json``, the manifest's shard list sanitized.

    A manifest is data, not a command line: its ``urls`` go through
    :func:`clipforge.data.shards.shards_from_file`, so a ``pipe:`` entry is refused, never run.
    """
    d = Path(scores_dir)
    if not (d / "scores.parquet").exists():
        raise FileNotFoundError(
            f"{d}/scores.parquet not found: run `clipforge curate run --output {d}` first"
        )
    manifest: dict[str, Any] = {}
    if (d / "manifest.json").exists():
        try:
            manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{d}/manifest.json is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{d}/manifest.json must hold an object, got {type(manifest).__name__}")
    manifest["urls"] = shards_from_file(manifest.get("urls") or [], source=f"{d}/manifest.json", expand=False)
    return pq.read_table(d / "scores.parquet"), manifest


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
    kept = [k for k, m in zip(keys, mask) if m]
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
        "shards": [],
    }
    if reshard and kept:
        urls = manifest["urls"]
        if not urls:
            raise FileNotFoundError(f"{scores_dir}/manifest.json lists no input shards to reshard from")
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
        summary["bad_samples"] = report.to_dict()["counts"]
        if written != len(kept):  # a shard changed or got damaged since scoring: say so, loudly
            log.warning("kept %d keys but wrote %d samples (see bad_samples)", len(kept), written)
    mask_frac = float(np.mean(mask)) if len(mask) else 0.0
    summary["kept_frac"] = mask_frac
    write_json(out / "filter.json", summary)
    return summary
