"""Consensus reranking (decode.rerank=consensus): neighbours vote among the beam's hypotheses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from caption_testutils import memorize

from clipforge.caption.captioner import Captioner
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.rerank import ConsensusMemory, pooled, rerank
from clipforge.caption.vocab import build_vocab
from clipforge.config import ConfigError

DOG = ["a dog runs on the grass", "a brown dog running on grass", "the dog runs across a lawn"]
BIKE = ["a man rides a bike", "a cyclist rides down the road", "a man on a bicycle"]


def memory() -> ConsensusMemory:
    vec = torch.eye(4)[[0, 0, 1, 1]] + 0.01 * torch.arange(4)[:, None]  # two dog images, two bike images
    return ConsensusMemory(vec, [DOG, DOG[::-1], BIKE, BIKE[::-1]])


def test_neighbours_and_consensus_follow_the_nearest_images():
    m = memory()
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    nn = m.neighbours(q, 2)
    assert set(nn[0].tolist()) == {0, 1} and set(nn[1].tolist()) == {2, 3}
    cands = [["a dog runs on grass", "a man rides a bike"]] * 2
    c = m.consensus(q, cands, k=2)
    assert c[0][0] > c[0][1] and c[1][1] > c[1][0]  # each row prefers its neighbours' words
    with pytest.raises(ValueError, match="4-d"):
        m.neighbours(torch.ones(1, 3), 1)
    tokens = torch.randn(3, 5, 4)  # a spatial condition is compared by its mean token
    assert torch.allclose(pooled(tokens), tokens.mean(1))


def test_rerank_orders_by_score_plus_weighted_consensus():
    cands = [["x", "y", "z"]]
    scores = [[-1.0, -1.5, -3.0]]
    cons = [np.array([0.0, 0.1, 0.9])]
    assert rerank(cands, scores, cons, 0.0, 3)[0] == [["x", "y", "z"]]  # weight 0: the decoder's order
    texts, s = rerank(cands, scores, cons, 10.0, 2)
    assert texts == [["z", "y"]] and s[0] == pytest.approx([6.0, -0.5])


def test_save_load_roundtrip(tmp_path):
    m = memory()
    m.save(tmp_path / "c.safetensors")
    back = ConsensusMemory.load(tmp_path / "c.safetensors")
    assert back.captions == m.captions and torch.equal(back.vectors, m.vectors)
    with pytest.raises(ValueError, match="vectors"):
        ConsensusMemory(torch.ones(2, 3), [DOG])


def test_captioner_reranks_its_beam_and_saves_the_memory(tmp_path):
    """A decoder that memorized two captions per condition: the beam holds both; the memory's
    neighbours decide which comes first, and the order flips when the neighbours' captions do."""
    torch.manual_seed(0)
    caps = ["a dog runs on the grass", "a man rides a bike"]
    vocab = build_vocab(caps + DOG + BIKE, min_count=1)
    dec = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), cond_dim=4, width=32, heads=2, layers=1))
    cond = torch.eye(4)[:1]
    memorize(dec, cond.repeat(2, 1), caps, vocab, steps=150)  # one condition, two targets: both in the beam
    meta = {"mode": "paired", "encoder": {"model": "x", "condition": "features"}}
    cap = Captioner(dec.eval(), vocab, meta)
    opts = DecodeOptions(method="beam", beam_width=4, num_candidates=2, rerank="consensus", rerank_k=2)
    with pytest.raises(ConfigError, match="consensus memory"):
        cap.candidates(cond, opts)
    plain, _ = cap.candidates(cond, DecodeOptions(method="beam", beam_width=4, num_candidates=4))
    assert set(caps) <= set(plain[0])
    for votes, want in ((DOG, caps[0]), (BIKE, caps[1])):
        cap.consensus = ConsensusMemory(torch.eye(4)[[0, 0, 1]], [votes, votes, DOG if votes is BIKE else BIKE])
        texts, scores = cap.candidates(cond, DecodeOptions(**{**opts.__dict__, "rerank_weight": 100.0}))
        assert texts[0][0] == want and len(texts[0]) == 2 and scores[0][0] >= scores[0][1]
        assert cap.caption(cond, opts)[0][0] in plain[0]  # reranking only reorders the beam
    cap.save(tmp_path / "cap")
    back = Captioner.load(tmp_path / "cap")
    assert back.consensus is not None and back.consensus.captions == cap.consensus.captions


def test_options_are_checked():
    DecodeOptions(method="beam", rerank="consensus").validate()
    for bad in (
        DecodeOptions(method="greedy", rerank="consensus"),
        DecodeOptions(method="beam", rerank="mbr"),
        DecodeOptions(method="beam", rerank="consensus", rerank_k=0),
    ):
        with pytest.raises(ConfigError, match="rerank"):
            bad.validate()
    assert "rerank=consensus k=20 w=32" in DecodeOptions(rerank="consensus").describe()
