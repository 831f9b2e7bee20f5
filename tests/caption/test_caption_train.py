"""Training pieces: length-bucketed epochs, CLOSE cross-caption inputs, CapDec noise, CPU-budget schedule."""

from __future__ import annotations

import pytest
import torch

from clipforge.caption.train import (
    CaptionTrainConfig,
    batch_inputs,
    epoch_batches,
    lr_by_fraction,
    make_pairs,
)
from clipforge.caption.vocab import build_vocab
from clipforge.config import ConfigError

CAPS = [[f"a dog {'runs ' * (i % 4)}fast", f"the dog number {i}", "one more dog"] for i in range(30)]


def pairs():
    vocab = build_vocab([c for cs in CAPS for c in cs], min_count=1)
    return make_pairs(CAPS, vocab, max_len=8), vocab


def test_epoch_batches_cover_every_pair_once_deterministically():
    p, _ = pairs()
    b = epoch_batches(p, batch_size=8, seed=0, epoch=3, chunk=2)
    flat = torch.cat(b).tolist()
    assert sorted(flat) == list(range(len(p))) and len(b) == -(-len(p) // 8)
    assert [x.tolist() for x in b] == [x.tolist() for x in epoch_batches(p, 8, 0, 3, chunk=2)]
    assert [x.tolist() for x in b] != [x.tolist() for x in epoch_batches(p, 8, 0, 4, chunk=2)]
    spread = [max(len(p.tokens[i]) for i in x) - min(len(p.tokens[i]) for i in x) for x in b]
    assert sum(spread) / len(spread) <= 2  # lengths bucketed: little padding


def test_long_captions_are_cut_but_keep_eos():
    p, vocab = pairs()
    assert all(len(t) <= 8 and t[-1] == vocab.eos_id for t in p.tokens)


def test_text_only_inputs_are_another_caption_plus_noise():
    p, vocab = pairs()
    text = torch.nn.functional.normalize(torch.randn(len(p), 16), dim=-1)
    idx = torch.arange(len(p))
    cfg = CaptionTrainConfig(mode="text-only", noise_std=0.0, cross_caption=True)
    x, _ = batch_inputs(idx, p, torch.zeros(30, 4), text, cfg, step=0, pad=vocab.pad_id)
    src = [int((text == row).all(1).nonzero()[0]) for row in x]
    assert all(s != i and p.image[s] == p.image[i] for i, s in enumerate(src))  # CLOSE: a sibling caption
    cfg = CaptionTrainConfig(mode="text-only", noise_std=0.1, cross_caption=False)
    x, _ = batch_inputs(idx, p, torch.zeros(30, 4), text, cfg, step=0, pad=vocab.pad_id)
    assert (x - text).std().item() == pytest.approx(0.1, rel=0.1)  # CapDec: Gaussian noise of sigma
    y, _ = batch_inputs(idx, p, torch.zeros(30, 4), text, cfg, step=0, pad=vocab.pad_id)
    assert torch.equal(x, y)  # a function of (seed, step): exact resume


def test_cpu_budget_schedule_and_config_checks():
    cfg = CaptionTrainConfig(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_by_fraction(4, 0.9, cfg) == pytest.approx(5e-4)  # warmup counts steps
    assert lr_by_fraction(50, 0.0, cfg) == pytest.approx(1e-3)
    assert lr_by_fraction(50, 1.5, cfg) == pytest.approx(1e-4)
    with pytest.raises(ConfigError):
        CaptionTrainConfig(mode="text-only", condition="features").validate()
    with pytest.raises(ConfigError):
        CaptionTrainConfig(cpu_budget_minutes=0).validate()


def test_tokenizer_choice_is_checked():
    assert CaptionTrainConfig(tokenizer="wordpiece").tokenizer == "wordpiece"
    with pytest.raises(ConfigError, match="tokenizer"):
        CaptionTrainConfig(tokenizer="bpe").validate()
