"""Retrieval grid PNG: a few text queries, each with its top-k images — the picture users check first.

Works from an already embedded :class:`ImageSet` (no re-embedding); only the k x queries winning
images are decoded again from the shards, by key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.data.decode import SkipSample, decode_image, find_image
from clipforge.data.reader import iter_tar_samples
from clipforge.data.shards import expand_shards
from clipforge.evaluate.embed import ImageSet, embed_texts


def fetch_images(shards: str | list[str], keys: set[str]) -> dict[str, Any]:
    """``key -> PIL image`` for the wanted keys (undecodable ones are left out)."""
    found: dict[str, Any] = {}
    for url in expand_shards(shards):
        for s in iter_tar_samples(url):
            if s["__key__"] in keys and s["__key__"] not in found:
                try:
                    found[s["__key__"]] = decode_image(find_image(s))
                except SkipSample:
                    continue
        if len(found) == len(keys):
            break
    return found


def retrieval_grid(
    model: Any,
    images: ImageSet,
    shards: str | list[str],
    queries: list[str],
    path: str | Path,
    k: int = 5,
) -> Path:
    """Save a ``len(queries) x k`` grid of the top-k images per query (with similarity) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipforge.utils import atomic_path

    if not queries:
        raise ValueError("retrieval grid needs at least one query")
    k = min(k, len(images))
    q = embed_texts(model, queries, progress=False, distributed=False)
    sims = q @ images.emb.T
    top = sims.topk(k, dim=1)
    keys = {images.keys[int(i)] for i in top.indices.flatten()}
    pics = fetch_images(shards, keys)
    fig, axes = plt.subplots(len(queries), k, figsize=(2.2 * k, 2.5 * len(queries)), squeeze=False)
    for r, text in enumerate(queries):
        for c in range(k):
            ax = axes[r][c]
            idx = int(top.indices[r, c])
            key = images.keys[idx]
            if key in pics:
                ax.imshow(pics[key])
            truth = images.captions is not None and text in images.captions[idx]
            ax.set_title(f"{float(top.values[r, c]):.3f}" + (" *" if truth else ""), fontsize=8)
            ax.axis("off")
        axes[r][0].text(0, -0.25, text[:90], transform=axes[r][0].transAxes, fontsize=9, ha="left")
    fig.suptitle(f"text -> top-{k} images (cosine; * = the query's own image)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
