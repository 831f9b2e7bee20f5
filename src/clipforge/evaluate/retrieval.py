"""Image<->text retrieval Recall@K with several captions per image, as CLIP_benchmark defines it.

* image -> text: an image query is correct at K if ANY of its captions is among the top K texts.
* text -> image: a text query is correct at K if ITS image is among the top K images.

Ties: scores are ranked with a stable descending sort, i.e. among equal scores the gallery item with
the lower index ranks first. A positive's rank is therefore ``#{scores > s} + #{lower-index items with
score == s}`` — deterministic, and what ``torch.topk`` gives on distinct scores. Computed in query
chunks, so a 5k x 25k (COCO-size) similarity never has to exist at once.
"""

from __future__ import annotations

import torch


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of each positive under stable-descending tie-breaking.

    scores: [Q, G]; positives: [Q, P] gallery indices, ``-1`` = padding. Returns [Q, P] (padding -> a
    huge rank).
    """
    q, g = scores.shape
    cols = torch.arange(g, device=scores.device)
    ranks = torch.full(positives.shape, torch.iinfo(torch.long).max, dtype=torch.long)
    for p in range(positives.shape[1]):
        pos = positives[:, p]
        valid = pos >= 0
        safe = pos.clamp(min=0)
        s = scores.gather(1, safe[:, None])  # [Q, 1]
        greater = (scores > s).sum(1)
        ties_before = ((scores == s) & (cols[None, :] < safe[:, None])).sum(1)
        r = greater + ties_before
        ranks[:, p] = torch.where(valid, r, ranks[:, p])
    return ranks


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | list[int],
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways. ``text_to_image[t]`` is the image index of caption ``t``.

    Returns ``{"image_to_text_R@K": ..., "text_to_image_R@K": ..., "mean_recall": ...}``.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if t2i.shape[0] != n_txt:
        raise ValueError(f"text_to_image has {t2i.shape[0]} entries for {n_txt} texts")
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_img:
        raise ValueError("text_to_image index out of range")
    image_emb, text_emb = image_emb.float(), text_emb.float()

    # image -> text: positives = that image's captions (padded to the max caption count)
    counts = torch.bincount(t2i, minlength=n_img)
    if int(counts.min()) == 0:
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption")
    order = torch.argsort(t2i, stable=True)
    pos = torch.full((n_img, int(counts.max())), -1, dtype=torch.long)
    slot = torch.zeros(n_img, dtype=torch.long)
    for t in order.tolist():
        i = int(t2i[t])
        pos[i, slot[i]] = t
        slot[i] += 1
    best_i2t = torch.cat(
        [
            positive_ranks(image_emb[a : a + chunk] @ text_emb.T, pos[a : a + chunk]).min(1).values
            for a in range(0, n_img, chunk)
        ]
    )
    # text -> image: one positive per text
    rank_t2i = torch.cat(
        [
            positive_ranks(text_emb[a : a + chunk] @ image_emb.T, t2i[a : a + chunk, None])[:, 0]
            for a in range(0, n_txt, chunk)
        ]
    )
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((best_i2t < k).float().mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((rank_t2i < k).float().mean())
    out["mean_recall"] = float(sum(out.values()) / len(out))
    return out


def flatten_captions(captions: list[list[str]]) -> tuple[list[str], list[int]]:
    """Per-image caption lists -> (all texts, image index of each text)."""
    texts: list[str] = []
    t2i: list[int] = []
    for i, caps in enumerate(captions):
        texts.extend(caps)
        t2i.extend([i] * len(caps))
    return texts, t2i
