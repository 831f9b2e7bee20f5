"""``clipforge curate report``: histograms of every score, filter counts, and contact sheets.

Why: a threshold is only as good as the look at the data behind it. Histograms show where a cut
falls, the counts show how filters overlap (their intersection is what training sees), and the
contact sheets of the lowest / highest scored pairs show what a filter actually removes.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipforge.curate.filter import apply_filters
from clipforge.curate.reshard import load_run
from clipforge.data.decode import IMAGE_EXTS
from clipforge.data.reader import iter_tar_samples
from clipforge.utils import atomic_path, write_json

SKIP_HIST = {"phash", "dhash"}


def numeric_columns(table: pa.Table) -> list[str]:
    out = []
    for f in table.schema:
        t = f.type
        if f.name in SKIP_HIST:
            continue
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            out.append(f.name)
    return out


def save_histograms(table: pa.Table, out_dir: Path) -> list[str]:
    """One PNG per numeric/boolean column (null count in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for c in numeric_columns(table):
        col = table.column(c)
        vals = col.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        vals = vals[np.isfinite(vals)]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if len(vals):
            ax.hist(vals, bins=2 if pa.types.is_boolean(col.type) else 50, color="#4477aa")
        ax.set_title(f"{c}  (n={len(vals)}, null={col.null_count})", fontsize=9)
        ax.set_xlabel(c)
        ax.set_ylabel("samples")
        fig.tight_layout()
        p = out_dir / "hist" / f"{c}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        paths.append(str(p))
    return paths


def fetch_samples(
    urls: list[str], shard_of: dict[str, str], keys: list[str]
) -> dict[str, tuple[bytes | None, str]]:
    """Image bytes and caption of a few keys, reading only the shards that hold them."""
    want = set(keys)
    by_shard = {shard_of[k] for k in keys if k in shard_of}
    out: dict[str, tuple[bytes | None, str]] = {}
    for url in urls:
        if Path(url).name not in by_shard:
            continue
        for s in iter_tar_samples(url):
            if s["__key__"] in want:
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                out[s["__key__"]] = (img, s.get("txt", b"").decode("utf-8", "replace"))
    return out


def contact_sheet(items: list[tuple[bytes | None, str, str]], path: Path, title: str, cols: int = 4) -> None:
    """Grid of thumbnails with caption and score under each (items: image bytes, caption, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = max(1, (len(items) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (data, cap, label) in zip(axes.ravel(), items):
        try:
            ax.imshow(Image.open(io.BytesIO(data)).convert("RGB")) if data else None
        except Exception:
            ax.text(0.5, 0.5, "undecodable", ha="center")
        ax.set_title(label + "\n" + "\n".join(textwrap.wrap(cap, 34)[:3]), fontsize=7)
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
) -> dict[str, Any]:
    """Histograms + filter counts + lowest/highest contact sheets under ``output``; returns the summary."""
    table, manifest = load_run(scores_dir)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
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
    if expressions:
        mask, counts = apply_filters(table, expressions)
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
        fetched = fetch_samples(manifest.get("urls", []), shard_of, need)
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
