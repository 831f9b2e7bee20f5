"""Readers for published compositionality benchmarks in a local directory (nothing is downloaded).

Expected layouts (the files as their authors publish them):

* ``sugar_crepe`` (SugarCrepe, as CLIP_benchmark reads it): ``DIR/{add_obj,add_att,replace_obj,
  replace_att,replace_rel,swap_obj,swap_att}.json``, each ``{"<id>": {"filename": "000000397133.jpg",
  "caption": ..., "negative_caption": ...}}``, images under ``DIR/val2017/`` (COCO val2017). Missing
  split files are skipped (and reported); at least one must exist.
* ``winoground``: ``DIR/examples.jsonl`` (one ``{"id", "image_0", "image_1", "caption_0",
  "caption_1", ...}`` per line, as in the Hugging Face dataset repo's ``data/examples.jsonl``) and
  ``DIR/images/<image_0>.png`` (the unzipped ``data/images.zip``; ``.jpg`` is accepted too).
* ``aro`` (ARO, Yuksekgonul et al. 2023): ``DIR/visual_genome_relation.json`` and/or
  ``DIR/visual_genome_attribution.json``, each a list of ``{"image_path", "bbox_x", "bbox_y",
  "bbox_w", "bbox_h", "true_caption", "false_caption", ...}``, images under ``DIR/images/`` (Visual
  Genome ``image_path`` names); as in ARO, the image is cropped to the box.

Each reader returns probe items ``{"id", "type", "image", "positive", "negative"}`` (``image`` a path;
``box`` [x, y, w, h] for ARO) or, for Winoground, ``{"id", "images": [p0, p1], "captions": [c0, c1]}``.
A malformed record is a counted skip (``skipped``: reason -> count), never a crash.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

SUGAR_CREPE_SPLITS = (
    "add_obj",
    "add_att",
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
)
ARO_FILES = {"vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json"}


def _inside(root: Path, rel: str) -> Path:
    """``root/rel``, refusing names that leave ``root`` (the JSON is untrusted)."""
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise ValueError(f"path {rel!r} leaves {root}")
    return p


def read_sugar_crepe(root: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    root = Path(root)
    items, skipped = [], Counter()
    found = [s for s in SUGAR_CREPE_SPLITS if (root / f"{s}.json").is_file()]
    if not found:
        raise FileNotFoundError(
            f"{root}: no SugarCrepe split files ({', '.join(s + '.json' for s in SUGAR_CREPE_SPLITS)})"
        )
    skipped.update({f"missing_split:{s}": 1 for s in SUGAR_CREPE_SPLITS if s not in found})
    for split in found:
        ann = json.loads((root / f"{split}.json").read_text())
        if not isinstance(ann, dict):
            raise ValueError(f"{root / split}.json: expected an object {{id: record}}")
        for k, r in ann.items():
            try:
                items.append({"id": f"{split}/{k}", "type": split, "image": str(_inside(root / "val2017", r["filename"])),
                              "positive": str(r["caption"]), "negative": str(r["negative_caption"])})  # fmt: skip
            except (KeyError, TypeError, ValueError):
                skipped["bad_record"] += 1
    return items, skipped


def read_aro(root: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    root = Path(root)
    found = {t: root / f for t, f in ARO_FILES.items() if (root / f).is_file()}
    if not found:
        raise FileNotFoundError(f"{root}: no ARO file ({', '.join(ARO_FILES.values())})")
    items, skipped = [], Counter()
    for t, path in found.items():
        data = json.loads(path.read_text())
        for i, r in enumerate(data if isinstance(data, list) else []):
            try:
                box = [float(r[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")]
                items.append({"id": f"{t}/{i}", "type": t, "image": str(_inside(root / "images", r["image_path"])),
                              "box": box, "positive": str(r["true_caption"]),
                              "negative": str(r["false_caption"])})  # fmt: skip
            except (KeyError, TypeError, ValueError):
                skipped["bad_record"] += 1
    return items, skipped


def read_winoground(root: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    root = Path(root)
    path = root / "examples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no examples.jsonl (Winoground layout: examples.jsonl + images/)")
    items, skipped = [], Counter()
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            imgs = []
            for k in ("image_0", "image_1"):
                name = str(r[k])
                cands = [_inside(root / "images", name + ext) for ext in ("", ".png", ".jpg")]
                imgs.append(str(next((c for c in cands if c.is_file()), cands[1])))
            items.append({"id": str(r.get("id", n)), "type": "winoground", "images": imgs,
                          "captions": [str(r["caption_0"]), str(r["caption_1"])]})  # fmt: skip
        except (KeyError, TypeError, ValueError):
            skipped["bad_record"] += 1
    return items, skipped
