"""Retrieval Recall@K against a brute-force reference, with ties and several captions per image."""

from __future__ import annotations

import pytest
import torch

from clipforge.evaluate.retrieval import flatten_captions, recall_at_k


def brute_force(sim: torch.Tensor, t2i: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Sort each query's gallery by (-score, index) — the documented stable tie rule — and check."""
    n_img, n_txt = sim.shape
    out = {}
    i2t_hits = {k: 0 for k in ks}
    for i in range(n_img):
        ranked = sorted(range(n_txt), key=lambda t: (-float(sim[i, t]), t))
        for k in ks:
            i2t_hits[k] += any(t2i[t] == i for t in ranked[:k])
    t2i_hits = {k: 0 for k in ks}
    for t in range(n_txt):
        ranked = sorted(range(n_img), key=lambda i: (-float(sim[i, t]), i))
        for k in ks:
            t2i_hits[k] += t2i[t] in ranked[:k]
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t_hits[k] / n_img
    for k in ks:
        out[f"text_to_image_R@{k}"] = t2i_hits[k] / n_txt
    return out


def as_embeddings(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings = identity rows, text embeddings = sim columns: image @ text.T == sim."""
    return torch.eye(sim.shape[0]), sim.T.clone()


def test_hand_built_ties() -> None:
    # 3 images, 5 captions: image 0 owns captions 0,1; image 1 owns 2; image 2 owns 3,4.
    sim = torch.tensor(
        [
            [0.5, 0.1, 0.5, 0.5, 0.0],  # caption 0 ties with 2 and 3 but has the lowest index -> rank 0
            [0.9, 0.2, 0.2, 0.9, 0.1],  # caption 2: 2 strictly better + 1 lower-index tie -> rank 3
            [0.3, 0.3, 0.3, 0.3, 0.3],  # all tied: caption 3 has 3 lower-index ties -> rank 3, caption 4 -> 4
        ]
    )
    t2i = [0, 0, 1, 2, 2]
    img, txt = as_embeddings(sim)
    got = recall_at_k(img, txt, t2i, ks=(1, 3, 4))
    assert got["image_to_text_R@1"] == pytest.approx(1 / 3)  # only image 0 (tie won by index)
    assert got["image_to_text_R@3"] == pytest.approx(1 / 3)
    assert got["image_to_text_R@4"] == pytest.approx(1.0)
    # text->image: caption 0 column (.5,.9,.3): its image 0 ranks 1; caption 1 (.1,.2,.3) -> rank 2;
    # caption 2 (.5,.2,.3) -> image 1 rank 2; caption 3 (.5,.9,.3) -> image 2 rank 2; caption 4 (0,.1,.3) -> 0
    assert got["text_to_image_R@1"] == pytest.approx(1 / 5)
    assert got == pytest.approx({**brute_force(sim, t2i, ks=(1, 3, 4)), "mean_recall": got["mean_recall"]})


@pytest.mark.parametrize("seed", range(5))
def test_random_quantized_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_img = 13
    t2i = [i for i in range(n_img) for _ in range(1 + int(torch.randint(0, 4, (1,), generator=g)))]
    t2i = [t2i[j] for j in torch.randperm(len(t2i), generator=g).tolist()]  # captions not grouped
    sim = torch.randint(0, 4, (n_img, len(t2i)), generator=g).float() / 4  # many ties
    img, txt = as_embeddings(sim)
    want = brute_force(sim, t2i)
    for chunk in (3, 1024):  # chunking must not change anything
        got = recall_at_k(img, txt, t2i, chunk=chunk)
        assert {k: got[k] for k in want} == pytest.approx(want)


def test_perfect_and_errors() -> None:
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    got = recall_at_k(emb, emb.clone(), list(range(6)))
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == 1.0
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(emb, emb[:5], [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="entries"):
        recall_at_k(emb, emb, [0, 1])
    texts, t2i = flatten_captions([["a", "b"], ["c"]])
    assert texts == ["a", "b", "c"] and t2i == [0, 0, 1]
