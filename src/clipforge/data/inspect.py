"""Look at a shard set before training on it: counts, caption/image-size histograms, a contact sheet, bad samples.

Every sample is decoded (JPEG draft mode keeps that cheap) so the bad-sample report is the same one a
training run would produce. The contact sheet shows N samples drawn uniformly (reservoir sampling,
seeded) with their keys and captions, for a human to eyeball image/caption alignment.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipforge.data.decode import DecodeConfig, SkipSample, decode_image, decode_sample, find_image
from clipforge.data.fields import raw_caption
from clipforge.data.parallel import ordered_map
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, shard_name
from clipforge.data.transforms import center_crop, resize_shortest
from clipforge.utils import atomic_path, write_json

CAPTION_WORD_BINS = [0, 5, 10, 15, 20, 30, 50, 100, 10**9]
IMAGE_SIDE_BINS = [0, 64, 128, 224, 256, 384, 512, 768, 1024, 2048, 10**9]


def _bin_label(lo: int, hi: int) -> str:
    return f">= {lo}" if hi >= 10**9 else f"{lo}-{hi - 1}"


def histogram(values: list[int], bins: list[int]) -> list[tuple[str, int]]:
    counts, _ = np.histogram(np.asarray(values, dtype=np.int64), bins=bins)
    return [(_bin_label(lo, hi), int(c)) for lo, hi, c in zip(bins[:-1], bins[1:], counts)]


def _measure(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode one sample (image at reduced JPEG scale): sizes and caption length, or SkipSample."""
    out = decode_sample(raw, DecodeConfig(draft_size=64))
    w, h = out["image"].info.get("original_size", out["image"].size)
    cap = out["caption"]
    return {"key": out["key"], "width": w, "height": h, "chars": len(cap), "words": len(cap.split())}


def inspect_shards(
    shards: list[str],
    output: str | Path | None = None,
    samples: int = 16,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Scan shards; returns a JSON-able summary and (if ``output``) writes PNGs and JSON reports there."""
    from tqdm import tqdm

    urls = expand_shards(shards)
    report = BadSampleReport()
    per_shard: dict[str, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    rng = random.Random(seed)
    reservoir: list[dict[str, Any]] = []
    seen_good = 0
    bar = tqdm(desc="inspect", unit="sample", disable=not progress)
    for url in urls:
        name = shard_name(url)
        stats = per_shard.setdefault(name, {"samples": 0, "good": 0, "bad": 0, "bytes": 0})
        for raw, result in ordered_map(_measure, iter_tar_samples(url, report), workers):
            bar.update(1)
            stats["samples"] += 1
            stats["bytes"] += sum(len(v) for k, v in raw.items() if not k.startswith("__"))
            if isinstance(result, SkipSample):
                stats["bad"] += 1
                report.add(f"{name}:{raw['__key__']}", result.reason, result.detail)
            else:
                stats["good"] += 1
                rows.append(result)
                seen_good += 1  # reservoir sampling over good samples: uniform, one pass
                if len(reservoir) < samples:
                    reservoir.append(raw)
                elif samples and (j := rng.randrange(seen_good)) < samples:
                    reservoir[j] = raw
            bar.set_postfix(bad=report.total, refresh=False)
    bar.close()
    n_samples = sum(s["samples"] for s in per_shard.values())
    words = [r["words"] for r in rows]
    chars = [r["chars"] for r in rows]
    short = [min(r["width"], r["height"]) for r in rows]
    long = [max(r["width"], r["height"]) for r in rows]
    summary: dict[str, Any] = {
        "shards": len(urls),
        "samples": n_samples,
        "good": len(rows),
        "bad": report.total,  # includes shard-level damage records (truncated/unreadable shards)
        "bytes": sum(s["bytes"] for s in per_shard.values()),
        "per_shard": per_shard,
        "caption_words": _describe(words),
        "caption_chars": _describe(chars),
        "caption_words_hist": histogram(words, CAPTION_WORD_BINS),
        "image_short_side_hist": histogram(short, IMAGE_SIDE_BINS),
        "image_long_side_hist": histogram(long, IMAGE_SIDE_BINS),
        "image_sizes_top": [
            [f"{w}x{h}", n] for (w, h), n in Counter((r["width"], r["height"]) for r in rows).most_common(5)
        ],
        "bad_samples": report.to_dict(),
    }
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "caption_hist": out / "caption_length_hist.png",
            "size_hist": out / "image_size_hist.png",
            "contact_sheet": out / "contact_sheet.png",
            "bad_samples": out / "bad_samples.json",
            "summary": out / "inspect.json",
        }
        plot_histograms(files["caption_hist"], {"caption length (words)": summary["caption_words_hist"]})
        plot_histograms(
            files["size_hist"],
            {
                "image shorter side (px)": summary["image_short_side_hist"],
                "image longer side (px)": summary["image_long_side_hist"],
            },
        )
        contact_sheet(files["contact_sheet"], reservoir)
        write_json(files["bad_samples"], report.to_dict())
        summary["files"] = {k: str(v) for k, v in files.items()}
        write_json(files["summary"], summary)
    return summary


def _describe(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    a = np.asarray(values)
    return {"min": int(a.min()), "mean": float(a.mean()), "median": float(np.median(a)), "max": int(a.max())}


def plot_histograms(path: Path, hists: dict[str, list[tuple[str, int]]]) -> None:
    """One bar chart per histogram, side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(hists), figsize=(6 * len(hists), 4), squeeze=False)
    for ax, (title, hist) in zip(axes[0], hists.items()):
        labels, counts = [h[0] for h in hist], [h[1] for h in hist]
        ax.bar(range(len(counts)), counts, color="#4c72b0")
        ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("samples")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def contact_sheet(path: Path, raws: list[dict[str, Any]], thumb: int = 256, cols: int | None = None) -> None:
    """Grid of thumbnails, each with its key and wrapped caption underneath."""
    n = len(raws)
    cols = cols or max(1, min(4, n))
    rows = max(1, -(-n // cols))
    font, bold = _font(15), _font(13)
    text_h = 6 * 19 + 8
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, raw in enumerate(raws):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + text_h + 8)
        try:
            img = center_crop(resize_shortest(decode_image(find_image(raw), draft_size=thumb), thumb), thumb)
            sheet.paste(img, (x, y))
        except SkipSample:
            draw.rectangle((x, y, x + thumb, y + thumb), outline="red")
        caption = (raw_caption(raw) or b"").decode("utf-8", "replace").strip()  # the one caption rule
        draw.text((x, y + thumb + 3), raw["__key__"][:34], fill="#666666", font=bold)
        lines = textwrap.wrap(caption, width=30)[:5]
        if len(textwrap.wrap(caption, width=30)) > 5:
            lines[-1] = lines[-1][:27] + "..."
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 21 + j * 19), line, fill="black", font=font)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable tables for the terminal."""
    from clipforge.utils import format_table

    parts = [
        format_table(
            [
                [k, v["samples"], v["good"], v["bad"], f"{v['bytes'] / 1e6:.1f}"]
                for k, v in summary["per_shard"].items()
            ]
            + [
                [
                    "TOTAL",
                    summary["samples"],
                    summary["good"],
                    summary["bad"],
                    f"{summary['bytes'] / 1e6:.1f}",
                ]
            ],
            ["shard", "samples", "good", "bad", "MB"],
        ),
        format_table(summary["caption_words_hist"], ["caption words", "samples"]),
        format_table(
            [
                [a[0], a[1], b[1]]
                for a, b in zip(summary["image_short_side_hist"], summary["image_long_side_hist"])
            ],
            ["image side px", "shorter side", "longer side"],
        ),
    ]
    bad = summary["bad_samples"]
    if bad["total"]:
        parts.append(
            format_table(sorted(bad["counts"].items(), key=lambda kv: -kv[1]), ["bad reason", "count"])
        )
    else:
        parts.append("bad samples: none")
    return "\n\n".join(parts)
