"""Cross-attention (CoCa) decoder on spatial image tokens: KV cache, memorization, decoding, the token
cache of a locked tower, captioners that read tokens (save/load, images, shards, the server engine)."""

from __future__ import annotations

import pytest
import torch
from caption_testutils import TinyCaptionClip, memorize, slice_shard
from PIL import Image
from torch import nn

from clipforge.caption import spatial
from clipforge.caption.captioner import Captioner
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig, load_decoder, save_decoder
from clipforge.caption.decoding import DecodeOptions, generate, generate_candidates
from clipforge.caption.vocab import build_vocab
from clipforge.config import ConfigError
from clipforge.models.base import ModelConfig

CORPUS = [
    "a dog runs on the green grass .",
    "two children play in the snow",
    "a man rides a red bike down the hill",
    "a black cat sleeps on a sofa",
]


def cross(vocab_size: int, tokens: int = 6, dim: int = 8, **kw) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, cond_dim=dim, cross_dim=dim, cross_tokens=tokens, width=32, heads=2,
               layers=2, dropout=0.0, max_len=16, prefix_len=1)  # fmt: skip
    return CaptionDecoder(DecoderConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def memorized():
    """4 random token grids whose MEAN is identical: only cross-attention can tell them apart."""
    vocab = build_vocab(CORPUS, min_count=1)
    model = cross(len(vocab))
    cond = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    cond = cond - cond.mean(1, keepdim=True)  # the prefix (mean token) is the same for all four
    model, ids = memorize(model, cond, CORPUS, vocab, steps=120)
    return model, vocab, cond, ids


def test_cross_kv_cache_matches_teacher_forcing():
    m = cross(20).eval()
    cond, toks = torch.randn(3, 6, 8), torch.randint(4, 20, (3, 7))
    toks[:, 0] = 1
    logits, cache = m.start(cond, 1)
    assert cache.cross is not None and len(cache.cross) == 2 and cache.cross[0][0].shape[2] == 6
    steps = [logits] + [m.step(toks[:, i], cache) for i in range(1, 7)]
    torch.testing.assert_close(torch.stack(steps, 1), m(cond, toks), atol=1e-5, rtol=1e-4)


def test_the_decoder_checks_its_condition_shape():
    m = cross(20).eval()
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        m.start(torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match="image tokens"):
        m.start(torch.randn(2, 5, 8), 1)  # built for 6 tokens
    with pytest.raises(ConfigError, match="cond_dim == cross_dim"):
        DecoderConfig(vocab_size=20, cond_dim=4, cross_dim=8).validate()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_memorized_captions_come_back_through_cross_attention(memorized, method):
    model, vocab, cond, ids = memorized
    seqs, _ = generate(model, cond, DecodeOptions(method=method, min_len=0, no_repeat_ngram=0), ids)
    assert [vocab.decode(s) for s in seqs] == [vocab.decode(vocab.encode([c])[0]) for c in CORPUS]


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_batched_decoding_equals_one_by_one(memorized, method):
    model, _, cond, ids = memorized
    opts = DecodeOptions(method=method, min_len=0, num_candidates=1 if method == "greedy" else 2, seed=3)
    together = generate_candidates(model, cond, opts, ids)
    if method == "sample":  # sampling seeds by the chunk's first row: compare same-size batches
        assert together == generate_candidates(model, cond, opts, ids)
        return
    alone = [generate_candidates(model, cond[i : i + 1], opts, ids) for i in range(4)]
    assert together[0] == [a[0][0] for a in alone]
    for got, a in zip(together[1], alone):
        assert got == pytest.approx(a[1][0], abs=1e-4)


def test_beam_never_regathers_the_image_keys(memorized, monkeypatch):
    """The image K/V are expanded once for the beams, then left alone (no copy per step)."""
    from clipforge.caption.decoder import KVCache

    model, _, cond, ids = memorized
    calls = []
    real = KVCache.select

    def spy(self, idx, cross=True):
        calls.append(cross)
        return real(self, idx, cross)

    monkeypatch.setattr(KVCache, "select", spy)
    generate(model, cond, DecodeOptions(method="beam", beam_width=3, min_len=0), ids)
    assert calls[0] is True and len(calls) > 2 and not any(calls[1:])


def test_cross_decoder_save_load_round_trip(tmp_path):
    m = cross(20).eval()
    save_decoder(tmp_path / "d", m)
    m2, _ = load_decoder(tmp_path / "d")
    assert m2.cfg.cross_dim == 8 and m2.cfg.cross_tokens == 6
    cond, toks = torch.randn(2, 6, 8), torch.randint(4, 20, (2, 5))
    assert torch.equal(m(cond, toks), m2(cond, toks))


# -- spatial tokens and their cache ----------------------------------------------------------------
class MapClip(TinyCaptionClip):
    """A locked tower whose frozen features include a 4x4 spatial map (3 channels): 16 tokens of 3."""

    def image_features(self, pixels):
        return {**super().image_features(pixels), "map": nn.functional.adaptive_avg_pool2d(pixels, 4)}


def map_clip() -> MapClip:
    cfg = ModelConfig(
        backend="py", spec="py:test_caption_spatial:map_clip", embed_dim=16, preprocess={"size": 32}
    )
    return MapClip(cfg).eval()


def locked_vit():
    """scratch:vit-nano (transformers CLIP vision model) at 32 px with a locked image tower."""
    from clipforge.models.hf import HFClipModel
    from clipforge.models.scratch import build_config
    from clipforge.models.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = build_config("scratch:vit-nano", image_size=32)
    cfg.options["unlock_image"] = 0
    return HFClipModel(cfg, tokenizer=Tokenizer.minilm(context_length=cfg.context_length), pretrained=False)


def test_spatial_tokens_of_a_locked_vit_are_its_patch_tokens():
    model = locked_vit().eval()
    px = torch.randn(2, 3, 32, 32)
    tok = spatial.spatial_tokens(model, px)
    with torch.no_grad():
        want = model.hf.vision_model(pixel_values=px).last_hidden_state
    assert torch.equal(tok, want) and tok.shape[1] > 1
    assert spatial.token_shape(model) == (tok.shape[1], tok.shape[2])


def test_spatial_needs_a_locked_tower_with_tokens():
    model = locked_vit()
    model.unlock_image = -1
    with pytest.raises(ConfigError, match="locked image tower"):
        spatial.spatial_tokens(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="no spatial image tokens"):
        spatial.spatial_tokens(TinyCaptionClip(map_clip().config), torch.randn(1, 3, 32, 32))


@pytest.fixture
def two_shards(flickr_test_shard, tmp_path):
    a = slice_shard(flickr_test_shard, tmp_path / "a.tar", 5, corrupt="zzbroken")
    b = tmp_path / "b.tar"
    import tarfile

    with tarfile.open(flickr_test_shard) as t, tarfile.open(b, "w") as o:  # samples 6..9 of the shard
        keys: list[str] = []
        for m in t:
            k = m.name.split(".")[0]
            if k not in keys:
                keys.append(k)
            if 6 <= len(keys) <= 9:
                o.addfile(m, t.extractfile(m))
            elif len(keys) > 9:
                break
    return [str(a), str(b)]


def test_the_token_cache_is_built_once_keyed_by_the_frozen_weights(two_shards, tmp_path, monkeypatch):
    model = map_clip()
    keys, tokens, root = spatial.load_or_build_spatial_cache(model, two_shards, tmp_path / "c", workers=0,
                                                             progress=False)  # fmt: skip
    assert tokens.dtype == torch.float16 and tuple(tokens.shape) == (9, 16, 3) and len(keys) == 9
    assert "zzbroken" not in keys and root.name.startswith("spatial-")
    assert len(list(root.glob("*.safetensors"))) == 2
    direct = spatial.shard_spatial_conditions(model, two_shards, workers=0, fields=())
    assert direct.keys == keys and torch.equal(direct.cond, tokens)
    assert direct.bad.counts and "zzbroken" in str(direct.bad.to_dict())

    def boom(*a, **k):
        raise AssertionError("the cached shards were encoded again")

    monkeypatch.setattr(spatial.encode, "encode_shards", boom)
    state = torch.get_rng_state()
    again = spatial.load_or_build_spatial_cache(model, two_shards, tmp_path / "c", workers=0, progress=False)
    assert again[0] == keys and torch.equal(again[1], tokens) and again[2] == root
    assert torch.equal(torch.get_rng_state(), state)
    other = map_clip()
    other.tok.weight.data += 1  # another frozen weight: another identity, another cache dir
    assert spatial.cache_fingerprint(other) != spatial.cache_fingerprint(model)
    rev = list(reversed(keys))
    assert torch.equal(spatial.align(rev, keys, tokens), tokens.flip(0))
    with pytest.raises(ValueError, match="no spatial tokens"):
        spatial.align(["nope"], keys, tokens)


def test_a_spatial_captioner_captions_images_and_shards(flickr_test_shard, tmp_path):
    """A cross-attention captioner on a locked ViT: saved, loaded, and fed tokens of PIL images, of
    shards, and by the server's engine, all the same captions."""
    from clipforge.serve.captioning import CaptionEngine, check_captioner

    model = locked_vit().eval()
    n_tok, dim = spatial.token_shape(model)
    vocab = build_vocab(CORPUS, min_count=1)
    dec = cross(len(vocab), tokens=n_tok, dim=dim).eval()
    meta = {"mode": "paired", "encoder": {"model": "x", "condition": "spatial", "model_opts": {},
            "fingerprint": spatial.encode.fingerprint(model, frozen_only=True)}}  # fmt: skip
    Captioner(dec, vocab, meta).save(tmp_path / "cap")
    cap = Captioner.load(tmp_path / "cap")
    assert cap.condition == "spatial" and cap.decoder.cfg.cross_tokens == n_tok
    check_captioner(cap, model)
    shard = slice_shard(flickr_test_shard, tmp_path / "s.tar", 3)
    opts = DecodeOptions(method="greedy", min_len=1)
    c = cap.shard_conditions(model, [str(shard)], workers=0, fields=())
    assert c.cond.shape == (3, n_tok, dim)
    from_shards, _ = cap.caption(c.cond, opts)
    import io
    import tarfile

    with tarfile.open(shard) as t:
        imgs = [
            Image.open(io.BytesIO(t.extractfile(m).read())).convert("RGB")
            for m in t
            if m.name.endswith(".jpg")
        ]
    assert cap.caption_images(model, imgs, opts) == from_shards
    engine = CaptionEngine(cap, model)
    engine.probe()
    torch.testing.assert_close(engine.conditions([model.preprocess(im) for im in imgs]), c.cond.float(),
                               atol=2e-2, rtol=1e-2)  # fmt: skip


# -- caption train --condition spatial -----------------------------------------------------------------
def test_caption_train_spatial_reads_cached_tokens_resumes_exactly_and_evaluates(
    shared_data, tmp_path, monkeypatch
):
    """``caption train --condition spatial``: a cross-attention decoder over the token cache (built
    once, next to the feature cache), bit-exact resume, a captioner that ``caption eval`` scores."""
    import shutil

    from safetensors.torch import load_file

    from clipforge.caption import metrics
    from clipforge.caption.evaluate import evaluate_captioning
    from clipforge.caption.train import CaptionTrainConfig, train_captioner

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    fl = shared_data / "flickr8k"
    train = [str(slice_shard(fl / "train-000000.tar", tmp_path / "t.tar", 10))]
    test = str(slice_shard(fl / "test-000000.tar", tmp_path / "e.tar", 4))
    spec = "py:test_caption_spatial:map_clip"
    cfg = {"data": train, "output": str(tmp_path / "a"), "model": spec, "condition": "spatial", "threads": 1,
           "workers": 0, "min_count": 1, "max_steps": 6, "batch_size": 8, "warmup": 2, "log_every": 2,
           "ckpt_every": 3, "keep": 5, "cache_dir": str(tmp_path / "c"), "eval_data": [test],
           "decoder": {"layers": 1, "width": 16, "heads": 2, "prefix_len": 2},
           "decode": {"method": "greedy", "min_len": 1}}  # fmt: skip
    s = train_captioner(cfg, progress=False)
    assert s["condition"] == "spatial" and s["steps"] == 6 and s["train_images"] == 10
    assert s["eval"]["n"] == 4 and list((tmp_path / "c").glob("spatial-*/*.safetensors"))
    cap = Captioner.load(tmp_path / "a" / "captioner")
    assert cap.condition == "spatial" and (cap.decoder.cfg.cross_tokens, cap.decoder.cfg.cross_dim) == (16, 3)
    # cut back to step 3 and resumed: the same weights (the tokens come back from the cache)
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-0000006")
    (b / "checkpoints" / "latest").write_text("step-0000003\n")
    train_captioner({**cfg, "output": str(b)}, resume=True, progress=False)
    wa, wb = (load_file(str(d / "captioner" / "model.safetensors")) for d in (tmp_path / "a", b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    r = evaluate_captioning(tmp_path / "a" / "captioner", test, encoder=spec, scoring_model="none",
                            decode=DecodeOptions(method="greedy", min_len=1), knn_k=3)  # fmt: skip
    assert [x["task"] for x in r["results"]][:2] == ["captioning", "captioning/constant"]
    assert r["results"][0]["metrics"]["n"] == 4
    with pytest.raises(ConfigError, match="text-only"):
        CaptionTrainConfig(mode="text-only", condition="spatial").validate()


def test_cross_grid_pools_the_token_map_before_cross_attention():
    from clipforge.caption.decoder import pool_grid
    from clipforge.caption.train import CaptionTrainConfig

    x = torch.randn(2, 16, 3)  # a 4x4 map
    pooled = pool_grid(x, 2)
    want = x.view(2, 2, 2, 2, 2, 3).mean((2, 4)).reshape(2, 4, 3)  # [b, gy, y, gx, x, c]: 2x2 blocks
    torch.testing.assert_close(pooled, want)
    assert pool_grid(x, 0) is x and pool_grid(x, 4) is x
    with pytest.raises(ValueError, match="square"):
        pool_grid(torch.randn(1, 6, 3), 2)
    m = cross(20, tokens=4, dim=3, cross_grid=2).eval()
    logits, cache = m.start(torch.randn(2, 16, 3), 1)
    assert cache.cross[0][0].shape[2] == 4 and logits.shape == (2, 20)
    with pytest.raises(ConfigError, match="cross_grid"):
        CaptionTrainConfig(decoder=DecoderConfig(cross_grid=2)).validate()
