"""``clipforge eval robustness``: zero-shot accuracy under common corruptions, applied in-process.

No CIFAR-10-C download: Gaussian noise, Gaussian blur, JPEG re-encoding and contrast reduction are
applied to each image at its native resolution (before the model's preprocessing), at 3 severities
taken from CIFAR-10-C's levels 1, 3 and 5 (Hendrycks & Dietterich 2019) for the same corruption.
Noise is seeded per (seed, image key), so a run is reproducible whatever the batch order. The result
is a curve per corruption (accuracy vs severity, severity 0 = clean) as JSON rows and a PNG.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from clipforge.evaluate.config import RobustnessConfig
from clipforge.models import encode

log = logging.getLogger(__name__)

# severity 1, 2, 3 = CIFAR-10-C levels 1, 3, 5 of the same corruption
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.04, 0.08, 0.10),  # std of N(0, s) added to pixels in [0, 1]
    "blur": (0.4, 0.7, 1.0),  # Gaussian blur sigma in pixels (at 32x32)
    "jpeg": (80, 58, 40),  # JPEG quality
    "contrast": (0.75, 0.4, 0.15),  # (x - mean) * c + mean
}
CORRUPTIONS = tuple(LEVELS)


def corrupt(
    img: Image.Image, kind: str, severity: int, rng: np.random.Generator | None = None
) -> Image.Image:
    """``img`` (RGB) under corruption ``kind`` at ``severity`` in 0..3 (0: unchanged)."""
    if kind not in LEVELS:
        raise ValueError(f"unknown corruption {kind!r}: use {', '.join(CORRUPTIONS)}")
    if severity == 0:
        return img
    if not 1 <= severity <= 3:
        raise ValueError(f"severity must be 0..3, got {severity}")
    c = LEVELS[kind][severity - 1]
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=c))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(c))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = np.asarray(img, dtype=np.float32) / 255.0
    if kind == "gaussian_noise":
        x = x + (rng or np.random.default_rng(0)).normal(0.0, c, size=x.shape)
    else:  # contrast
        x = (x - x.mean(axis=(0, 1), keepdims=True)) * c + x.mean(axis=(0, 1), keepdims=True)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def load_labelled(
    shards: str | list[str], limit: int | None
) -> tuple[list[str], list[Image.Image], list[int], Any]:
    """The first ``limit`` decodable labelled images of ``shards`` (bad samples counted, not fatal)."""
    from clipforge.data.decode import DecodeConfig, decode_sample
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.report import BadSampleReport
    from clipforge.data.shards import expand_shards
    from clipforge.data.skip import SkipSample

    report = BadSampleReport()
    keys, imgs, labels = [], [], []
    for url in expand_shards(shards):
        for s in iter_tar_samples(url, report):
            if limit is not None and len(keys) >= limit:
                return keys, imgs, labels, report
            try:
                d = decode_sample(s, DecodeConfig(image=True, caption=False, label=True))
            except SkipSample as e:
                report.add(s.get("__key__", "?"), e.reason, e.detail)
                continue
            keys.append(d["key"])
            imgs.append(d["image"].convert("RGB"))
            labels.append(int(d["label"]))
    return keys, imgs, labels, report


def plot_curves(curves: dict[str, list[float]], clean: float, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipforge.utils import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, accs in curves.items():
        ax.plot(range(len(accs) + 1), [clean, *accs], marker="o", label=kind)
    ax.set_xticks(range(4))
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("zero-shot top-1")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run_robustness(model: Any, config: RobustnessConfig | dict[str, Any] | None = None) -> dict[str, Any]:
    """Zero-shot top-1 on clean and corrupted images -> eval result dict (+ PNG under ``output``)."""
    from clipforge.config import from_dict, write_run_config
    from clipforge.evaluate.recipes import builtin
    from clipforge.evaluate.results import shard_fingerprint
    from clipforge.evaluate.runner import model_info
    from clipforge.evaluate.zeroshot import (
        class_embeddings,
        load_classnames,
        load_templates,
        zeroshot_metrics,
    )
    from clipforge.utils import write_json

    cfg = config if isinstance(config, RobustnessConfig) else from_dict(RobustnessConfig, config or {})
    t_all = time.perf_counter()
    if cfg.shards:
        shards, classnames_path, name = list(cfg.shards), cfg.classnames, "custom"
        if not classnames_path:
            raise ValueError("robustness on your own shards needs --classnames FILE")
    else:
        spec = builtin("cifar10", cfg.data_root)
        shards, classnames_path, name = spec.shards, spec.classnames, "cifar10"
    classnames = load_classnames(classnames_path)
    keys, imgs, labels, report = load_labelled(shards, cfg.limit or None)
    if not keys:
        raise ValueError(f"no decodable labelled images in {shards}: {report.summary()}")
    y = torch.tensor(labels)
    _, tlist = load_templates(cfg.templates)
    fp = encode.fingerprint(model)
    cls = class_embeddings(
        model, classnames, tlist, fingerprint=fp, precision=cfg.precision, progress=cfg.progress
    )

    def top1(kind: str, sev: int) -> float:
        rows = []
        for s in range(0, len(imgs), cfg.batch_size):
            batch = [
                corrupt(im, kind, sev, np.random.default_rng([cfg.seed, zlib.crc32(k.encode()), sev]))
                for k, im in zip(keys[s : s + cfg.batch_size], imgs[s : s + cfg.batch_size])
            ]
            rows.append(encode.embed_pil_images(model, batch, cfg.precision))
        return zeroshot_metrics(torch.from_numpy(np.concatenate(rows)), cls, y)[0]["top1"]

    t0 = time.perf_counter()
    clean = top1(CORRUPTIONS[0], 0)
    curves = {k: [top1(k, s) for s in range(1, 4)] for k in cfg.corruptions}
    seconds = time.perf_counter() - t0
    shard_fp = shard_fingerprint(shards)
    results = []
    for kind, accs in curves.items():
        m = {"top1_clean": clean, **{f"top1_s{s}": a for s, a in enumerate(accs, 1)}}
        m["mean_corrupted"] = float(np.mean(accs))
        m["relative_s3"] = accs[-1] / clean if clean > 0 else float("nan")
        m["n_images"] = len(keys)
        results.append({"task": f"robustness/{kind}", "dataset": name, "shards": shard_fp,
                        "templates": cfg.templates, "levels": list(LEVELS[kind]), "metrics": m})  # fmt: skip
    out = {
        "clipforge_eval": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(model, fp),
        "settings": {
            "limit": cfg.limit,
            "seed": cfg.seed,
            "precision": cfg.precision,
            "torch_threads": torch.get_num_threads(),
        },  # fmt: skip
        "results": results,
        "bad_samples": report.to_dict(),
        "seconds": time.perf_counter() - t_all,
        "seconds_images": seconds,
    }
    if cfg.output:
        odir = Path(cfg.output)
        spec_name = out["model"].get("spec", "model")
        out["curve_png"] = str(plot_curves(curves, clean, odir / "robustness.png",
                                           f"{spec_name}: {name} zero-shot, {len(keys)} images"))  # fmt: skip
        write_json(odir / "results.json", out)
        write_run_config(odir / "config.yaml", cfg)
    return out


def robustness_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        rows.append([r["task"].split("/", 1)[1], m["top1_clean"], m["top1_s1"], m["top1_s2"], m["top1_s3"]])
    return rows
