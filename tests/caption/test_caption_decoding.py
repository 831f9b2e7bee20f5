"""Decoder + decoding: KV cache equals teacher forcing, memorization, determinism, bans and guards."""

from __future__ import annotations

import pytest
import torch
from caption_testutils import memorize

from clipforge.caption.decoder import CaptionDecoder, DecoderConfig, load_decoder, save_decoder
from clipforge.caption.decoding import DecodeOptions, SpecialIds, generate, ngram_repeats
from clipforge.caption.vocab import build_vocab

CORPUS = [
    "a dog runs on the green grass .",
    "two children play in the snow",
    "a man rides a red bike down the hill",
    "a black cat sleeps on a sofa",
]


def tiny(vocab_size: int, **kw) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, cond_dim=8, width=32, heads=2, layers=2, dropout=0.0, max_len=16)
    return CaptionDecoder(DecoderConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def memorized():
    """A decoder trained 80 full-batch steps to map 4 random vectors to 4 captions."""
    vocab = build_vocab(CORPUS, min_count=1)
    model = tiny(len(vocab))
    cond = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    model, ids = memorize(model, cond, CORPUS, vocab, steps=80)
    return model, vocab, cond, ids


def test_kv_cache_matches_teacher_forcing():
    m = tiny(20).eval()
    cond, toks = torch.randn(3, 8), torch.randint(4, 20, (3, 7))
    toks[:, 0] = 1  # BOS
    logits, cache = m.start(cond, 1)
    full = m(cond, toks)
    steps = [logits] + [m.step(toks[:, i], cache) for i in range(1, 7)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    m = tiny(20).eval()
    save_decoder(tmp_path / "d", m, {"note": 1})
    m2, extra = load_decoder(tmp_path / "d")
    assert extra == {"note": 1} and m2.lm_head.weight is m2.tok_emb.weight  # tied after loading
    cond, toks = torch.randn(2, 8), torch.randint(4, 20, (2, 5))
    assert torch.equal(m(cond, toks), m2(cond, toks))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_memorized_captions_come_back(memorized, method):
    model, vocab, cond, ids = memorized
    opts = DecodeOptions(method=method, min_len=1, no_repeat_ngram=0)
    seqs, _ = generate(model, cond, opts, ids)
    assert [vocab.decode(s) for s in seqs] == [" ".join(vocab.words(c)) for c in CORPUS]


def test_beam_width_one_is_greedy(memorized):
    model, _, cond, ids = memorized
    noisy = cond + 0.8 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    greedy, _ = generate(model, noisy, DecodeOptions(method="greedy"), ids)
    beam, _ = generate(model, noisy, DecodeOptions(method="beam", beam_width=1, length_penalty=0.0), ids)
    assert beam == greedy


def test_sampling_is_seeded(memorized):
    model, _, cond, ids = memorized
    cond = cond.repeat(4, 1) + torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    opts = DecodeOptions(method="sample", temperature=1.5, top_p=0.95, seed=7)
    a, _ = generate(model, cond, opts, ids)
    b, _ = generate(model, cond, opts, ids)
    c, _ = generate(model, cond, DecodeOptions(method="sample", temperature=1.5, top_p=0.95, seed=8), ids)
    assert a == b and a != c
    k1, _ = generate(model, cond, DecodeOptions(method="sample", top_k=1, seed=9), ids)
    g, _ = generate(model, cond, DecodeOptions(method="greedy"), ids)
    assert k1 == g  # top-1 sampling is greedy


def _repeater(vocab_size: int, favourite: int, eos: int | None = None) -> CaptionDecoder:
    """An untrained decoder whose output bias makes one word (or EOS) always the most likely."""
    m = tiny(vocab_size, tie_embeddings=False).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.ln_f.weight.zero_()
        m.ln_f.bias.zero_()
        m.ln_f.bias[0] = 1.0
        m.lm_head.weight[favourite, 0] = 10.0
        m.lm_head.weight[favourite + 1, 0] = 9.0
        m.lm_head.weight[favourite + 2, 0] = 8.0
        if eos is not None:
            m.lm_head.weight[eos, 0] = 20.0
    return m


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_no_repeat_ngram_blocks_repeats(method):
    ids = SpecialIds(bos=1, eos=2, pad=0, unk=3)
    m = _repeater(12, favourite=5)
    plain, _ = generate(
        m, torch.randn(2, 8), DecodeOptions(method=method, no_repeat_ngram=0, max_len=10), ids
    )
    assert ngram_repeats(plain[0], 2) > 0  # the decoder wants "5 5 5 ..."
    for n in (1, 2, 3):
        seqs, _ = generate(
            m, torch.randn(2, 8), DecodeOptions(method=method, no_repeat_ngram=n, max_len=10), ids
        )
        assert all(ngram_repeats(s, n) == 0 for s in seqs)


def test_min_len_masks_eos_and_max_len_stops():
    ids = SpecialIds(bos=1, eos=2, pad=0, unk=3)
    m = _repeater(12, favourite=5, eos=2)  # EOS is by far the most likely first word
    for method in ("greedy", "beam", "sample"):
        seqs, _ = generate(m, torch.randn(3, 8), DecodeOptions(method=method, min_len=4, max_len=12), ids)
        assert all(len(s) == 4 for s in seqs), seqs  # EOS right after the minimum, never before
    seqs, _ = generate(_repeater(12, 5), torch.randn(2, 8), DecodeOptions(method="greedy", max_len=6), ids)
    assert all(len(s) == 6 and 3 not in s and 1 not in s for s in seqs)  # no UNK/BOS, cut at max_len


def test_options_are_checked():
    with pytest.raises(ValueError):
        DecodeOptions(method="nucleus").validate()
    with pytest.raises(ValueError):
        DecodeOptions(min_len=5, max_len=5).validate()


@pytest.mark.parametrize("method", ["beam", "sample"])
def test_candidates_first_is_the_single_caption(memorized, method):
    from clipforge.caption.decoding import generate_candidates

    model, _, cond, ids = memorized
    noisy = cond + 0.8 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    opts = DecodeOptions(method=method, beam_width=3, num_candidates=3, seed=4)
    cands, scores = generate_candidates(model, noisy, opts, ids)
    single, _ = generate(model, noisy, DecodeOptions(method=method, beam_width=3, seed=4), ids)
    assert [c[0] for c in cands] == single and all(len(c) == 3 for c in cands)
    if method == "beam":
        assert all(s == sorted(s, reverse=True) for s in scores)  # best first
        assert all(len({tuple(x) for x in c}) == 3 for c in cands)  # distinct hypotheses
    with pytest.raises(ValueError):
        DecodeOptions(method="greedy", num_candidates=2).validate()
