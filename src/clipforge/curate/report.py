"""``clipforge curate report``: histograms of every score, filter counts, and contact sheets.

Why: a threshold is only as good as the look at the data behind it. Histograms show where a cut
falls, the counts show how filters overlap (their intersection is what training sees), and the
contact sheets of the lowest / highest scored pairs show what a filter actually removes.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipforge.curate.filter import apply_filters
from clipforge.curate.outputs import prepare_output
from clipforge.curate.reshard import load_run
from clipforge.data.decode import IMAGE_EXTS, SkipSample, decode_image
from clipforge.data.fields import sample_fields
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.utils import atomic_path, write_json

SKIP_HIST = {"phash", "dhash"}
MAX_EXAMPLES = 200  # pairs per contact sheet: one figure, drawn in memory
THUMB = 256  # contact-sheet images are decoded at about this size (JPEG draft), never at full size


def numeric_columns(table: pa.Table) -> list[str]:
    out = []
    for f in table.schema:
        t = f.type
        if f.name in SKIP_HIST:
            continue
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out.append(f.name)
    return out


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Text drawn on plots comes from the data (captions, keys, column names): with mathtext on, a caption
# like ``$\undefinedmacro{x}$`` is parsed as TeX and raises when the figure is drawn. Plain text only.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def save_histograms(table: pa.Table, out_dir: Path) -> list[str]:
    """One PNG per numeric/boolean column (null count in the title)."""
    plt = pyplot()
    with plt.rc_context(PLAIN_TEXT):
        return [_histogram(plt, table, c, out_dir) for c in numeric_columns(table)]


def _histogram(plt: Any, table: pa.Table, c: str, out_dir: Path) -> str:
    col = table.column(c)
    vals = col.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    vals = vals[np.isfinite(vals)]
    drawn = vals[np.abs(vals) <= 1e300]  # a wider range overflows the bin edges: such values are counted only
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for bins in (2 if pa.types.is_boolean(col.type) else 50, 1):
        try:  # 50 bins of a range too narrow for float64 steps raise: one bin then
            if len(drawn):
                ax.hist(drawn, bins=bins, color="#4477aa")
            break
        except ValueError:
            ax.cla()
    extra = f", {len(vals) - len(drawn)} beyond 1e300 not drawn" if len(drawn) < len(vals) else ""
    ax.set_title(f"{c}  (n={len(vals)}, null={col.null_count}{extra})", fontsize=9)
    ax.set_xlabel(c)
    ax.set_ylabel("samples")
    fig.tight_layout()
    p = out_dir / "hist" / f"{safe_name(c)}.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return str(p)


def safe_name(name: str) -> str:
    """A column name as a file name (a crafted column like ``../../x`` stays inside the report dir)."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100].lstrip(".")
    return s or "column"


def fetch_samples(
    urls: list[str], shard_of: dict[str, str], keys: list[str], report: BadSampleReport | None = None
) -> dict[str, tuple[bytes | None, str]]:
    """Image bytes and caption of a few keys, reading only the shards that hold them."""
    want = set(keys)
    by_shard = {shard_of[k] for k in keys if k in shard_of}
    out: dict[str, tuple[bytes | None, str]] = {}
    for url in urls:
        if Path(url).name not in by_shard:
            continue
        for s in iter_tar_samples(url, report):
            if s["__key__"] in want:
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                out[s["__key__"]] = (img, sample_fields(s, label=False).caption or "")
    return out


def contact_sheet(items: list[tuple[bytes | None, str, str]], path: Path, title: str, cols: int = 4) -> None:
    """Grid of thumbnails with caption and score under each (items: image bytes, caption, label)."""
    plt = pyplot()
    rows = max(1, (len(items) + cols - 1) // cols)
    with plt.rc_context(PLAIN_TEXT):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3.4), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (data, cap, label) in zip(axes.ravel(), items):
            try:
                ax.imshow(decode_image(data, THUMB)) if data else None
            except SkipSample as e:
                ax.text(0.5, 0.5, f"undecodable ({e.reason})", ha="center")
            ax.set_title(label + "\n" + "\n".join(textwrap.wrap(cap[:500], 34)[:3]), fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)


def build_report(
    scores_dir: str | Path,
    output: str | Path,
    expressions: list[str] | None = None,
    examples: int = 8,
    sheet_column: str = "clip_score",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Histograms + filter counts + lowest/highest contact sheets under ``output``; returns the summary.

    ``output`` must be new or empty, or ``overwrite`` replaces it (no sheets of an earlier report left
    beside the new ones); the expressions are checked first.
    """
    if not 0 <= examples <= MAX_EXAMPLES:
        raise ValueError(
            f"--examples must be in [0, {MAX_EXAMPLES}] (pairs per contact sheet), got {examples}"
        )
    table, manifest = load_run(scores_dir)
    filtered = apply_filters(table, expressions) if expressions else None
    inputs = [Path(scores_dir) / "scores.parquet", Path(scores_dir) / "manifest.json", *manifest["urls"]]
    out = prepare_output(output, overwrite=overwrite, inputs=inputs)
    summary: dict[str, Any] = {"rows": table.num_rows, "histograms": save_histograms(table, out)}
    stats: dict[str, Any] = {}
    for c in numeric_columns(table):
        v = table.column(c).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        if len(v):
            stats[c] = {
                "mean": float(v.mean()),
                "p5": float(np.percentile(v, 5)),
                "p50": float(np.median(v)),
                "p95": float(np.percentile(v, 95)),
                "null": table.column(c).null_count,
            }
    summary["stats"] = stats
    if filtered is not None:
        mask, counts = filtered
        summary["filters"] = counts
        summary["intersection"] = {
            "kept": int(mask.sum()),
            "kept_frac": float(mask.mean()) if len(mask) else 0.0,
        }
    if sheet_column in table.column_names and examples > 0:
        keys = table.column("key").to_pylist()
        vals = np.array(
            [np.nan if v is None else v for v in table.column(sheet_column).to_pylist()], dtype=float
        )
        ok = np.flatnonzero(~np.isnan(vals))
        order = ok[np.argsort(vals[ok])]
        pick = {"lowest": order[:examples], "highest": order[::-1][:examples]}
        shard_of = dict(zip(keys, table.column("shard").to_pylist()))
        need = [keys[i] for idx in pick.values() for i in idx]
        bad = BadSampleReport()
        fetched = fetch_samples(manifest["urls"], shard_of, need, bad)
        summary["bad_samples"] = bad.to_dict()["counts"]
        summary["sheets"] = {}
        for name, idx in pick.items():
            items = [
                (*fetched.get(keys[i], (None, "")), f"{keys[i][:18]}  {sheet_column}={vals[i]:.3f}")
                for i in idx
            ]
            p = out / f"{name}_{sheet_column}.png"
            contact_sheet(items, p, f"{name} {sheet_column}")
            summary["sheets"][name] = str(p)
    write_json(out / "report.json", summary)
    return summary
