"""Sanity baselines for captioning scores: what a captioner must beat to mean anything.

- ``constant``: the most frequent training caption, for every image (measured on flickr8k test by
  issue 12's prototype: BLEU-4 0.051, CIDEr 0.116);
- ``nearest``: the first caption of the nearest training image (cosine of condition vectors);
- ``knn_consensus`` (Devlin et al. 2015): among the captions of the k nearest training images, the
  one most similar to the others (TF-IDF over word uni+bigrams, mean cosine to the other candidates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.caption.metrics import simple_tokenize


def constant_caption(train_captions: Sequence[Sequence[str]]) -> str:
    """The most frequent training caption (after tokenizing; ties: alphabetical)."""
    counts = Counter(simple_tokenize(c) for caps in train_captions for c in caps)
    return min(counts, key=lambda c: (-counts[c], c))


def neighbours(train_cond: torch.Tensor, test_cond: torch.Tensor, k: int) -> torch.Tensor:
    """[N_test, k] indices of the most cosine-similar training rows."""
    a, b = F.normalize(test_cond.float(), dim=-1), F.normalize(train_cond.float(), dim=-1)
    out = []
    for s in range(0, a.shape[0], 512):
        out.append((a[s : s + 512] @ b.T).topk(min(k, b.shape[0]), dim=1).indices)
    return torch.cat(out)


def consensus(candidates: Sequence[str]) -> str:
    """The candidate with the highest mean TF-IDF cosine to the other candidates."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(candidates) == 1:
        return candidates[0]
    try:
        x = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"[a-z0-9]+").fit_transform(
            [simple_tokenize(c) for c in candidates]
        )
    except ValueError:  # nothing but stop-words / empty candidates
        return candidates[0]
    sims = (x @ x.T).toarray()
    np.fill_diagonal(sims, 0.0)
    return candidates[int(sims.mean(1).argmax())]


def baseline_captions(
    train_cond: torch.Tensor,
    train_captions: Sequence[Sequence[str]],
    test_cond: torch.Tensor,
    k: int = 40,
) -> dict[str, list[str]]:
    """Captions of every test row by each baseline."""
    nn_idx = neighbours(train_cond, test_cond, k)
    const = constant_caption(train_captions)
    nearest = [train_captions[int(row[0])][0] for row in nn_idx]
    knn = [consensus([c for j in row.tolist() for c in train_captions[j]]) for row in nn_idx]
    return {"constant": [const] * len(test_cond), "nearest": nearest, f"knn_consensus_k{k}": knn}
