"""CLIP_benchmark's webdataset layout as an eval data set: ``--dataset wds:DIR``.

The layout (clip_benchmark 1.6 ``datasets/builder.py:build_wds_dataset`` and
``webdataset_builder.py``, which writes it)::

    DIR/{split}/0.tar .. N-1.tar     samples: an image (webp | png | jpg | jpeg) + ``cls`` (label) or
                                     ``txt`` (captions, one per line: retrieval data sets)
    DIR/{split}/nshards.txt          N (CLIP_benchmark requires it; without it the *.tar files are used)
    DIR/classnames.txt               one class name per line, in label order
    DIR/zeroshot_classification_templates.txt   one template per line, the class written ``{c}``
    DIR/dataset_type.txt             ``retrieval`` | ``multilabel`` (absent: classification)

``wds:DIR`` evaluates the ``test`` split; ``wds:DIR/SPLIT`` another one. A classification set gets
zero-shot with its own class names and templates (``template.format(c=name)`` as CLIP_benchmark does;
written to a clipforge template file under ``$CLIPFORGE_CACHE/wds``), a retrieval set image<->text
retrieval over each sample's caption lines (``str.splitlines`` of ``txt``, as CLIP_benchmark reads
them). Without ``dataset_type.txt`` a set whose first sample has ``txt`` and no ``cls`` is retrieval.
Multilabel sets (``npy`` labels) are refused: clipforge's zero-shot metrics are single-label.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from clipforge.utils import atomic_path

PREFIX = "wds:"
DEFAULT_SPLIT = "test"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
SPLIT_CAPTIONS = "caption_lines"  # DatasetSpec.meta flag: a sample's txt holds one caption per line


def is_wds(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def locate(path: str | Path) -> tuple[Path, str]:
    """(dataset root, split) of ``DIR`` (its ``test`` split) or ``DIR/SPLIT`` (a dir of *.tar files)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"wds data set {p} not found (a CLIP_benchmark webdataset dir)")
    if (p / DEFAULT_SPLIT).is_dir():
        return p, DEFAULT_SPLIT
    if any(p.glob("*.tar")) and p.parent.is_dir():
        return p.parent, p.name
    splits = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*.tar")))
    hint = f"; its splits: {', '.join(splits)} (use wds:{p}/SPLIT)" if splits else ""
    raise FileNotFoundError(f"{p} has no {DEFAULT_SPLIT}/ dir of .tar shards{hint}")


def shard_list(root: Path, split: str) -> list[str]:
    """``{split}/0.tar .. N-1.tar`` by ``nshards.txt`` (each must exist), else every ``*.tar`` in
    numeric order."""
    d = root / split
    n_file = d / "nshards.txt"
    if n_file.is_file():
        text = n_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{n_file}: expected a positive shard count, got {text[:40]!r}")
        shards = [d / f"{i}.tar" for i in range(int(text))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{d}: nshards.txt says {text} shards, missing {', '.join(missing[:5])}")
        return [str(s) for s in shards]
    tars = sorted(d.glob("*.tar"), key=lambda s: (0, int(s.stem)) if s.stem.isdigit() else (1, s.stem))
    if not tars:
        raise FileNotFoundError(f"{d} holds no .tar shards")
    return [str(s) for s in tars]


def read_lines(path: Path) -> list[str]:
    """CLIP_benchmark's reading: ``[line.strip() for line in text.splitlines()]``."""
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]


def dataset_type(root: Path, first_shard: str) -> str:
    """``classification`` | ``retrieval`` | ``multilabel``: dataset_type.txt, else by the first sample."""
    f = root / TYPE_FILE
    if f.is_file():
        kind = f.read_text(encoding="utf-8").strip().lower() or "classification"
        if kind not in ("classification", "retrieval", "multilabel"):
            raise ValueError(
                f"{f}: unknown dataset type {kind[:40]!r} (classification | retrieval | multilabel)"
            )
        return kind
    exts = first_sample_members(first_shard)
    if "npy" in exts and "cls" not in exts:
        return "multilabel"
    return "retrieval" if "txt" in exts and "cls" not in exts else "classification"


def first_sample_members(shard: str) -> set[str]:
    """The member extensions of the first sample of a tar (``KEY.EXT``)."""
    exts: set[str] = set()
    key = None
    with tarfile.open(shard) as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, _, ext = Path(m.name).name.partition(".")
            if key is not None and k != key:
                break
            key = k
            exts.add(ext.lower())
    return exts


def clipforge_templates(templates: list[str]) -> list[str]:
    """CLIP_benchmark templates (``{c}``, filled with ``str.format(c=name)``) as clipforge's (``{}``,
    filled with ``str.format(name)``): the same strings for every class name."""
    out = []
    for t in templates:
        if not t:
            continue
        if "{c}" not in t:
            raise ValueError(f"template {t[:80]!r} has no {{c}} placeholder (CLIP_benchmark's class slot)")
        probe = t.format(c="\0")  # CLIP_benchmark's own formatting: escapes ({{ }}) resolved here
        out.append(probe.replace("{", "{{").replace("}", "}}").replace("\0", "{}"))
    return out


def derived_file(kind: str, payload: Any) -> str:
    """A JSON file under ``$CLIPFORGE_CACHE/wds`` named by its content (written once, atomically)."""
    text = json.dumps(payload, ensure_ascii=False, indent=0)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    root = Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "wds"
    path = root / f"{kind}-{digest}.json"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    return str(path)


def dataset_name(root: Path, split: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name) or "wds"
    base = base if base.startswith("wds") else f"wds_{base}"
    return base if split == DEFAULT_SPLIT else f"{base}_{split}"


def wds_spec(name: str) -> Any:
    """``wds:DIR`` -> a :class:`~clipforge.evaluate.recipes.DatasetSpec` with the set's own class
    names and templates (zero-shot) or caption lines (retrieval)."""
    from clipforge.evaluate.recipes import DatasetSpec

    root, split = locate(name[len(PREFIX) :] if is_wds(name) else name)
    shards = shard_list(root, split)
    kind = dataset_type(root, shards[0])
    meta = {"wds": str(root), "split": split, "type": kind}
    label = dataset_name(root, split)
    if kind == "multilabel":
        raise ValueError(
            f"{root} is a multilabel data set (npy labels): clipforge's zero-shot is single-label"
        )
    if kind == "retrieval":
        return DatasetSpec(label, shards, tasks=("retrieval",), meta={**meta, SPLIT_CAPTIONS: True})
    for f in (CLASSNAMES, TEMPLATES):
        if not (root / f).is_file():
            raise FileNotFoundError(f"{root / f} not found: a wds classification set needs it for zero-shot")
    classnames = read_lines(root / CLASSNAMES)
    if not any(classnames):
        raise ValueError(f"{root / CLASSNAMES} lists no class names")
    # read by clipforge's class-name loader: the same strip()ped lines, except that it skips trailing blank
    # lines (any other blank line is an error: it would shift every later label) and reads '_' as ' '
    # (CLIP_benchmark's own class names have spaces)
    templates = clipforge_templates(read_lines(root / TEMPLATES))
    if not templates:
        raise ValueError(f"{root / TEMPLATES} lists no templates")
    return DatasetSpec(label, shards, classnames=str(root / CLASSNAMES), templates=derived_file("templates", templates),
                       tasks=("zeroshot",), meta=meta)  # fmt: skip


def split_caption_lines(captions: list[list[str]]) -> tuple[list[list[str]], int]:
    """Each sample's ``txt`` (read as one caption) -> its lines, as CLIP_benchmark's ``str.splitlines``;
    blank lines are dropped (and counted: an image left with no caption is an error)."""
    out, dropped = [], 0
    for caps in captions:
        lines = [ln.strip() for c in caps for ln in c.splitlines()]
        kept = [ln for ln in lines if ln]
        dropped += len(lines) - len(kept)
        out.append(kept)
    return out, dropped


def embed_caption_lines(model: Any, spec: Any, cfg: Any) -> Any:
    """The images of a retrieval set with each sample's caption lines (what the runner's retrieval takes
    from ``images``): embedded as any eval image set, then ``txt`` split into lines. A sample with no
    caption line left is skipped and counted (``empty_caption``) in the set's bad-sample report."""
    from clipforge.evaluate.embed import embed_images

    imgs = embed_images(
        model, spec.shards, captions=True, batch_size=cfg.batch_size, workers=cfg.workers,
        image_size=cfg.image_size, channels_last=cfg.channels_last, precision=cfg.precision,
        progress=cfg.progress, desc=f"embed {spec.name}",
    )  # fmt: skip
    caps, _ = split_caption_lines(imgs.captions or [])
    keep = [i for i, c in enumerate(caps) if c]
    for i in range(len(caps)):
        if not caps[i]:
            imgs.bad.add(imgs.keys[i], "empty_caption", "no non-blank line in txt")
    imgs.captions = caps
    return imgs if len(keep) == len(caps) else imgs.subset(keep)


def prepare_images(model: Any, datasets: list[Any], cfg: Any, images: dict[str, Any]) -> None:
    """Embed the caption-line (retrieval) wds sets of ``datasets`` into ``images`` (keyed by name), so
    that ``evaluate(..., images=images)`` retrieves over their caption lines."""
    for spec in datasets:
        wanted = [t for t in getattr(spec, "tasks", ()) if cfg.tasks is None or t in cfg.tasks]
        if (
            getattr(spec, "meta", {}).get(SPLIT_CAPTIONS)
            and "retrieval" in wanted
            and spec.name not in images
        ):
            images[spec.name] = embed_caption_lines(model, spec, cfg)
