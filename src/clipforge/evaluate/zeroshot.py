"""Zero-shot classification: prompt-ensembled class embeddings, metrics, confusion-matrix PNG.

Class embedding (CLIP's ensembling): embed every ``template.format(classname)`` (normalized), average
over templates, renormalize. Optional CuPL-style descriptions (JSON ``{class: [sentences]}``) are
embedded the same way and join the average. Class embeddings are cached on disk per (model weights,
template set, descriptions, class names), so re-running an evaluation only embeds images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.config import ConfigError
from clipforge.evaluate.dist import all_gather_object, is_main
from clipforge.evaluate.embed import embed_texts
from clipforge.models.encode import fingerprint as model_fingerprint

log = logging.getLogger(__name__)


# -- templates / class names ----------------------------------------------------------------------
def available_templates() -> list[str]:
    root = resources.files("clipforge.evaluate") / "templates"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_templates(name_or_path: str) -> tuple[str, list[str]]:
    """A shipped template set by name (``imagenet80``, ``cifar10``, ``simple``) or a JSON/TXT file.

    A file is either JSON (a list, or ``{"templates": [...]}``) or text, one template per line;
    every template must contain ``{}``. Returns ``(name, templates)``.
    """
    path = Path(name_or_path)
    if path.suffix in (".json", ".txt") and path.exists():
        name, text = str(path), path.read_text()
    else:
        res = resources.files("clipforge.evaluate") / "templates" / f"{name_or_path}.json"
        if not res.is_file():
            raise ValueError(
                f"unknown template set {name_or_path!r}: use one of {available_templates()} or a file path"
            )
        name, text = name_or_path, res.read_text()
    if name.endswith(".txt"):
        templates = [t.strip() for t in text.splitlines() if t.strip()]
    else:
        data = json.loads(text)
        templates = data["templates"] if isinstance(data, dict) else data
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if not templates or bad:
        raise ValueError(f"template set {name!r}: every template needs a '{{}}' placeholder (bad: {bad[:3]})")
    return name, list(templates)


def load_classnames(path: str | Path) -> list[str]:
    """Class names in label order: a ``.json`` list of strings, or text with one name per line.

    Names are stripped and ``_`` reads as a space. The position of a name is its label, so anything
    that would silently shift or merge labels is a :class:`ConfigError` naming the file and the entry:
    a non-string JSON entry, a blank name (only blank lines at the end of a text file are ignored:
    they shift nothing), and a name given twice (compared ignoring case and spacing, as CLIP's
    tokenizer does): two identical zero-shot classes split their images and make accuracy wrong.
    """
    path = Path(path)
    is_json = path.suffix.lower() == ".json"
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if is_json else text.splitlines()
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"class names file {path}: {e}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"class names file {path}: expected a JSON list of names, got {type(raw).__name__}")
    while not is_json and raw and not raw[-1].strip():
        raw.pop()  # trailing blank lines of a text file: no label moves
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw):
        at = f"entry {i}" if is_json else f"line {i + 1}"
        where = f"class names file {path}, {at} (label {i}) {str(entry)[:80]!r}"
        if not isinstance(entry, str):
            raise ConfigError(f"{where} is a {type(entry).__name__}, not a string")
        name = entry.replace("_", " ").strip()
        if not name:
            raise ConfigError(f"{where} is blank: every label needs a name (remove the line or name it)")
        norm = " ".join(name.split()).casefold()
        if norm in seen:
            raise ConfigError(f"{where} repeats label {seen[norm]}: class names must be distinct")
        seen[norm] = i
        names.append(name)
    if not names:
        raise ConfigError(f"no class names in {path}")
    return names


def load_descriptions(path: str | Path, classnames: list[str]) -> dict[str, list[str]]:
    """CuPL-style ``{class: [sentence, ...]}``; every class must have at least one sentence."""
    data = json.loads(Path(path).read_text())
    norm = {k.replace("_", " "): v for k, v in data.items()}
    missing = [c for c in classnames if not norm.get(c)]
    if missing:
        raise ValueError(
            f"descriptions file {path} has no sentences for {len(missing)} classes: {missing[:5]}"
        )
    return {c: [str(s) for s in norm[c]] for c in classnames}


# -- class embeddings -----------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "zeroshot"


def class_embeddings(
    model: Any,
    classnames: list[str],
    templates: list[str],
    descriptions: dict[str, list[str]] | None = None,
    *,
    cache: bool | str | Path = True,
    batch_size: int = 256,
    fingerprint: str | None = None,
    precision: str = "fp32",
    progress: bool = True,
) -> torch.Tensor:
    """[C, D] normalized class embeddings = renormalized mean of normalized prompt embeddings."""
    from safetensors.torch import load_file, save_file

    from clipforge.utils import atomic_path

    path = None
    if cache:
        fp = fingerprint or model_fingerprint(model)
        key = hashlib.sha256(
            json.dumps([fp, classnames, templates, descriptions or {}, precision], sort_keys=True).encode()
        ).hexdigest()[:24]
        root = cache_dir() if cache is True else Path(cache)
        path = root / f"{key}.safetensors"
        emb = None
        if path.exists():
            try:
                emb = load_file(str(path))["classes"]
                emb = emb if emb.shape[0] == len(classnames) else None
            except Exception as e:  # a corrupt cache file is rebuilt, not fatal
                log.warning("ignoring unreadable class-embedding cache %s: %s", path, e)
        # collective decision: a rank that misses (e.g. node-local cache) must not gather alone
        if all(h for h in all_gather_object(emb is not None)):
            return emb
    texts: list[str] = []
    owner: list[int] = []
    for c, name in enumerate(classnames):
        sents = [t.format(name) for t in templates] + list((descriptions or {}).get(name, []))
        texts.extend(sents)
        owner.extend([c] * len(sents))
    emb = embed_texts(
        model, texts, batch_size=batch_size, precision=precision, progress=progress, desc="embed prompts"
    )
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(classnames), emb.shape[1]).index_add_(0, owner_t, emb)
    out = torch.nn.functional.normalize(sums / torch.bincount(owner_t)[:, None].float(), dim=-1)
    if path is not None:
        if is_main():
            with atomic_path(path) as tmp:
                save_file({"classes": out.contiguous()}, str(tmp))
    return out


# -- metrics --------------------------------------------------------------------------------------
def zeroshot_metrics(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, float], np.ndarray]:
    """top-1, top-5 (``top5`` is top-min(5, C)), mean per-class recall; plus the confusion matrix.

    Ties in the top-1 go to the lower class index (argmax). Classes with no images are left out of
    the per-class mean. Returns ``(metrics, confusion[C_true, C_pred])``.
    """
    n_cls = class_emb.shape[0]
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
        raise ValueError(f"labels outside [0, {n_cls}) for {n_cls} class names")
    logits = image_emb.float() @ class_emb.float().T
    k = min(5, n_cls)
    topk = logits.topk(k, dim=1).indices
    pred = logits.argmax(1)
    top1 = (pred == labels).float()
    top5 = (topk == labels[:, None]).any(1).float()
    conf = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(conf, (labels.numpy(), pred.numpy()), 1)
    support = conf.sum(1)
    recalls = np.diag(conf)[support > 0] / support[support > 0]
    metrics = {
        "top1": float(top1.mean()),
        "top5": float(top5.mean()),
        "mean_per_class_recall": float(recalls.mean()) if len(recalls) else 0.0,
        "n_images": int(labels.numel()),
    }
    return metrics, conf


def plot_confusion(conf: np.ndarray, classnames: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix as a PNG (counts written in cells for <= 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipforge.utils import atomic_path

    n = len(classnames)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(5.0, min(0.45 * n + 2, 30.0))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = n <= 60
    if ticks:
        ax.set_xticks(range(n), classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classnames, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "zero-shot confusion (row-normalized)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
