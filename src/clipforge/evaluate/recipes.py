"""Built-in evaluation datasets (recipes) for the real shards, and the documented probe split.

* ``cifar10``: zero-shot on all 10,000 test images (``cifar10/test-{000000..000009}.tar``, CLIP's
  CIFAR-10 templates) and a linear probe on a split of the *same* test set, since no train set is
  shipped. **Probe split** (:func:`probe_split`): per class, the samples sorted by key are permuted
  with ``numpy.random.default_rng(seed)`` (seed 0) and the first 50% go to probe-train, the next 10%
  to probe-val (choosing C), the last 40% to probe-test (reported). With 1,000 images per class:
  5,000 / 1,000 / 4,000. Zero-shot numbers use all 10,000 images and are not comparable with the
  probe-test number's subset.
* ``flickr8k``: retrieval on the 1,000 test images (``flickr8k/test-000000.tar``) x their 5 captions
  (KEY.json ``captions``; KEY.txt when a sample has none).

Any user shards with ``.cls`` labels (or KEY.json ``label``) and a class-names file work the same way
through :class:`DatasetSpec`, and so does a CLIP_benchmark webdataset dir as ``wds:DIR`` (evaluate/wds.py:
its own class names and templates, or its caption lines for retrieval).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class DatasetSpec:
    """One evaluation dataset: shards, and what it supports."""

    name: str
    shards: str | list[str]
    classnames: str | None = None  # file (one name per line, label order) -> zero-shot / probe
    templates: str = "imagenet80"  # template set name or file for zero-shot
    tasks: tuple[str, ...] = ("zeroshot", "probe")  # subset of zeroshot | probe | retrieval
    probe_fractions: tuple[float, float, float] = (0.5, 0.1, 0.4)
    meta: dict = field(default_factory=dict)

    @property
    def needs_labels(self) -> bool:
        return bool({"zeroshot", "probe"} & set(self.tasks))

    @property
    def needs_captions(self) -> bool:
        return "retrieval" in self.tasks


BUILTIN = {
    "cifar10": dict(
        shards="cifar10/test-{000000..000009}.tar",
        classnames="cifar10/classnames.txt",
        templates="cifar10",
        tasks=("zeroshot", "probe"),
    ),
    "flickr8k": dict(shards="flickr8k/test-000000.tar", tasks=("retrieval",)),
}


def default_data_root() -> Path | None:
    """``$CLIPFORGE_DATA``, else ``../shared/data`` from the working directory or the checkout."""
    env = os.environ.get("CLIPFORGE_DATA")
    candidates = [Path(env)] if env else []
    candidates += [
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[4] / "shared" / "data",
    ]
    return next((c for c in candidates if c.is_dir()), None)


def builtin(name: str, data_root: str | Path | None = None) -> DatasetSpec:
    """A built-in recipe with its paths resolved under ``data_root`` (default: :func:`default_data_root`),
    or ``wds:DIR``: a CLIP_benchmark webdataset dir (:mod:`clipforge.evaluate.wds`)."""
    from clipforge.evaluate.wds import is_wds, wds_spec

    if is_wds(name):
        return wds_spec(name)
    if name not in BUILTIN:
        raise ValueError(
            f"unknown dataset {name!r}: built-ins are {sorted(BUILTIN)}, or wds:DIR (CLIP_benchmark)"
        )
    root = Path(data_root) if data_root else default_data_root()
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            "no data root: pass --data-root DIR (containing cifar10/ and flickr8k/) or set CLIPFORGE_DATA"
        )
    r = dict(BUILTIN[name])
    r["shards"] = str(root / r["shards"])
    if r.get("classnames"):
        r["classnames"] = str(root / r["classnames"])
    return DatasetSpec(name=name, **r)


def probe_split(
    labels: np.ndarray,
    keys: list[str],
    fractions: tuple[float, float, float] = (0.5, 0.1, 0.4),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified split -> (train, val, test) row indices; depends only on (keys, labels, seed).

    Per class: sort members by key, permute with ``default_rng(seed)``, cut at the fractions
    (rounded down for train and val; the remainder is test).
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"probe fractions must be positive and sum to 1, got {fractions}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        members = sorted(np.nonzero(labels == c)[0].tolist(), key=lambda i: keys[i])
        members = [members[i] for i in rng.permutation(len(members))]
        n_tr = int(len(members) * fractions[0])
        n_va = int(len(members) * fractions[1])
        parts[0] += members[:n_tr]
        parts[1] += members[n_tr : n_tr + n_va]
        parts[2] += members[n_tr + n_va :]
    tr, va, te = (np.array(sorted(p), dtype=np.int64) for p in parts)
    return tr, va, te
