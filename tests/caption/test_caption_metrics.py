"""Captioning metrics against hand-computed values; CLIPScore formulas; baselines."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.caption import metrics
from clipforge.caption.baselines import baseline_captions, consensus, constant_caption
from clipforge.caption.metrics import (
    caption_stats,
    clip_score_from_embeddings,
    coco_scores,
    ref_clip_score_from_embeddings,
    self_retrieval,
)

needs_java = pytest.mark.skipif(
    not metrics.java_available(), reason="java not installed (PTB tokenizer, METEOR)"
)


def _hand_bleu_checks(s: dict) -> None:
    # "the cat sat on the mat" vs "the cat is on the mat": clipped n-gram precision 5/6, 3/5, 1/4, 0/3,
    # equal lengths (no brevity penalty): BLEU-n = geometric mean of the first n precisions
    assert s["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert s["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    assert s["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert s["bleu4"] < 1e-3
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6 words both ways -> F = 5/6
    assert s["rouge_l"] == pytest.approx(5 / 6, abs=1e-6)


@needs_java
def test_bleu_and_rouge_by_hand_with_ptb():
    s = coco_scores({"1": "the cat sat on the mat"}, {"1": ["The cat is on the mat."]}, meteor=False)
    _hand_bleu_checks(s)
    assert s["tokenizer"] == "ptb" and s["comparable"]


def test_without_java_numbers_are_marked_and_meteor_left_out(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    s = coco_scores({"1": "the cat sat on the mat"}, {"1": ["The cat is on the mat."]})
    _hand_bleu_checks(s)
    assert s["comparable"] is False and "meteor" not in s and "java" in s["note"]


REFS = {"a": ["a dog runs on the grass"], "b": ["a man rides a red bike"], "c": ["two kids play in snow"]}


def _check_max(same: dict) -> None:
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert same[k] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_identical_captions_score_max_with_ptb_and_meteor():
    same = coco_scores({k: v[0] for k, v in REFS.items()}, REFS)
    _check_max(same)
    assert same["meteor"] == pytest.approx(1.0, abs=1e-6)


def test_identical_captions_score_max(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    same = coco_scores({k: v[0] for k, v in REFS.items()}, REFS)
    other = coco_scores({"a": "a man rides", "b": "two kids play", "c": "a dog runs"}, REFS)
    _check_max(same)
    assert same["cider_d"] > 5 * max(other["cider_d"], 0.1)


def test_missing_candidate_is_an_error():
    with pytest.raises(ValueError, match="without a candidate"):
        coco_scores({}, {"a": ["x"]})


def test_clip_score_formula_and_ref_harmonic_mean():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
    s = clip_score_from_embeddings(img, txt)
    np.testing.assert_allclose(s, [2.5 * 2**-0.5, 0.0, 2.5], atol=1e-6)  # w * max(cos, 0)
    refs = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0]]), np.array([[0.0, -1.0]])]
    r = ref_clip_score_from_embeddings(s, txt, refs)
    best = 2**-0.5  # cosine of (1, 1) with its closest reference
    assert r[0] == pytest.approx(2 * s[0] * best / (s[0] + best))
    assert r[1] == 0.0 and r[2] == 0.0  # CLIPScore 0, or no reference on the caption's side


def test_self_retrieval_and_stats():
    e = np.eye(6)
    assert self_retrieval(e, e) == {"r@1": 1.0, "r@5": 1.0}
    shuffled = e[[1, 0, 2, 3, 4, 5]]
    assert self_retrieval(shuffled, e)["r@1"] == pytest.approx(4 / 6)
    st = caption_stats(["A dog runs .", "a dog runs", "a cat"], ["a dog runs"])
    assert st["distinct"] == 2 and st["vocab_size"] == 4 and st["novel_share"] == pytest.approx(1 / 3)
    assert st["mean_length"] == pytest.approx(8 / 3)


def test_baselines():
    train = [["a dog runs", "a dog is running"], ["a dog runs", "a red car"], ["a cat sleeps", "cat on sofa"]]
    assert constant_caption(train) == "a dog runs"
    assert consensus(["a dog runs", "a dog runs fast", "the sky"]) in ("a dog runs", "a dog runs fast")
    import torch

    train_cond = torch.eye(3)
    test_cond = torch.tensor([[0.0, 0.1, 1.0], [1.0, 0.0, 0.0]])
    b = baseline_captions(train_cond, train, test_cond, k=2)
    assert b["nearest"] == ["a cat sleeps", "a dog runs"]
    assert b["constant"] == ["a dog runs", "a dog runs"]
    assert len(b["knn_consensus_k2"]) == 2
