"""`clipforge train --loss coca`: contrastive + captioning decoder on the same batches, one model dir that
embeds and captions, exact resume, both losses in metrics.jsonl, strict nested config."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from train_testutils import write_slice

from clipforge.caption.decoding import DecodeOptions
from clipforge.config import ConfigError
from clipforge.train import train
from clipforge.train.cli import config_from_args, register
from clipforge.train.config import TrainConfig
from clipforge.train.hooks import TrainHooks
from clipforge.train.loop import fit

SMALL_DECODER = {"vocab_min_count": 2, "width": 32, "layers": 1, "heads": 2, "prefix_len": 2, "dropout": 0.0}


def _cfg(out: Path, **kw) -> dict:
    base = {
        "output": str(out),
        "steps": 12,
        "batch_size": 8,
        "lr": 3e-3,
        "workers": 0,
        "progress": False,
        "tensorboard": False,
        "threads": 1,
        "loss": "coca",
        "caption": dict(SMALL_DECODER),
    }
    return {**base, **kw}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _images(shard: str, n: int) -> list[Image.Image]:
    out = []
    with tarfile.open(shard) as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                out.append(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
            if len(out) == n:
                break
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture
def shards(flickr_test_shard, tmp_path) -> list[str]:
    return write_slice(flickr_test_shard, tmp_path / "s", 2, 8, corrupt=False)


def test_coca_trains_both_losses_and_the_saved_dir_embeds_and_captions(shards, tmp_path):
    from clipforge.models import load_model

    model = load_model("scratch:vit-nano")
    out = tmp_path / "run"
    fit(model, shards, _cfg(out, steps=16))
    rows = _rows(out)
    assert {"loss", "contrastive_loss", "caption_loss", "caption_grad_norm"} <= set(rows[0])
    for col in ("contrastive_loss", "caption_loss"):
        first, last = _mean([r[col] for r in rows[:3]]), _mean([r[col] for r in rows[-3:]])
        assert last < first, (col, first, last)
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["contrastive_loss"] + 2.0 * r["caption_loss"], rel=1e-5)
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "caption_vocab.json").is_file()

    model_dir = out / "model"
    assert (model_dir / "captioner" / "vocab.json").is_file()
    loaded = load_model(model_dir)
    assert not any(k.startswith("caption_decoder") for k in load_file(str(model_dir / "model.safetensors")))
    pixels = torch.randn(3, 3, 64, 64)
    tokens = model.tokenize(["a dog runs", "two people", "a red car"])
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.encode_image(pixels), loaded.encode_image(pixels))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    imgs = _images(shards[0], 4)
    greedy = DecodeOptions(method="greedy")
    caps = model.caption(imgs, greedy)
    assert caps == loaded.caption(imgs, greedy)
    assert len(caps) == 4 and all(c.strip() for c in caps)
    assert loaded.captioner.meta["coca"] and loaded.captioner.condition == "embedding"
    # caption run / eval read MODEL_DIR/captioner as any captioner: its encoder is the model dir
    from clipforge.caption.captioner import Captioner

    cap = Captioner.load(model_dir / "captioner")
    assert cap.caption_images(cap.load_encoder(), imgs, greedy) == caps
    # a moved model dir still finds its own encoder (the recorded absolute path is stale then)
    moved = tmp_path / "moved" / "model"
    moved.parent.mkdir()
    model_dir.rename(moved)
    cap = Captioner.load(moved / "captioner")
    assert cap.caption_images(cap.load_encoder(), imgs, greedy) == caps


class _Crash(RuntimeError):
    pass


def _crash_at(n: int) -> TrainHooks:
    def hook(step: int) -> None:
        if step == n:
            raise _Crash(f"killed at step {n}")

    return TrainHooks(on_step_end=hook)


@pytest.mark.parametrize(
    "model,opts,mode",
    [
        ("py:tiny_model:make_tiny", {"lock_image": 1, "lock_text": 1}, "cached"),
        ("scratch:vit-nano", {}, "streaming"),
    ],
)
def test_coca_resume_reproduces_the_same_losses(model, opts, mode, shards, tmp_path):
    kw = {"model": model, "model_opts": opts, "data": shards, "steps": 8, "save_every": 3}
    ref = train(_cfg(tmp_path / "ref", **kw))
    assert ref["mode"] == mode
    with pytest.raises(_Crash):
        train(_cfg(tmp_path / "cut", **kw), _crash_at(5))
    resumed = train(_cfg(tmp_path / "cut", resume=True, **kw))
    assert resumed["steps"] == 8
    cols = ("step", "loss", "contrastive_loss", "caption_loss")
    assert [[r[c] for c in cols] for r in _rows(tmp_path / "cut")] == [
        [r[c] for c in cols] for r in _rows(tmp_path / "ref")
    ]
    for name in ("checkpoints/step-0000008/model.safetensors",):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and any(k.startswith("caption_decoder.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_coca_on_a_locked_tower_leaves_the_contrastive_side_as_a_clip_run(shards, tmp_path):
    """features condition: the decoder reads cached frozen features, so the heads train exactly as
    with --loss clip (own init seed, own grad clipping) while the decoder learns to caption."""
    kw = {"model": "py:tiny_model:make_tiny", "model_opts": {"lock_image": 1, "lock_text": 1}, "data": shards}
    coca = train(_cfg(tmp_path / "coca", **kw))
    clip = train(_cfg(tmp_path / "clip", **{**kw, "loss": "clip"}))
    assert coca["mode"] == clip["mode"] == "cached"
    assert [r["contrastive_loss"] for r in _rows(tmp_path / "coca")] == [
        r["loss"] for r in _rows(tmp_path / "clip")
    ]
    a = load_file(str(tmp_path / "coca" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "clip" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cap = json.loads((tmp_path / "coca" / "model" / "captioner" / "config.json").read_text())
    assert cap["encoder"]["condition"] == "features"


def _parse(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(["train", *argv])


def test_coca_config_is_strict_and_has_flags(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        TrainConfig.from_any({"loss": "coca", "data": ["a.tar"], "steps": 1, "caption": {"widht": 64}})
    bad = tmp_path / "cfg.yaml"
    bad.write_text(yaml.safe_dump({"loss": "coca", "data": ["a.tar"], "steps": 1, "caption": {"layrs": 2}}))
    with pytest.raises(ConfigError, match="did you mean 'layers'"):
        config_from_args(_parse(["--config", str(bad)]))
    cfg = config_from_args(
        _parse(["--data", "a.tar", "--steps", "1", "--loss", "coca", "--caption-weight", "1.5",
                "--caption.width", "64", "--caption.condition", "embedding"])
    )  # fmt: skip
    assert cfg.caption_weight == 1.5 and cfg.caption.width == 64 and cfg.caption.condition == "embedding"
    assert TrainConfig.from_any({"data": ["a.tar"], "steps": 1}).caption_weight == 2.0
    with pytest.raises(ConfigError, match="caption.condition"):
        TrainConfig.from_any({"data": ["a.tar"], "steps": 1, "caption": {"condition": "pixels"}})


@pytest.mark.parametrize("condition,lock", [("embedding", 0), ("features", 1)])
def test_coca_gradcache_equals_full_batch(condition, lock):
    """accum > 1: each micro-batch adds its token share of the caption loss in pass 3; the gradients
    (contrastive and caption, decoder and image side) are the full batch's."""
    from tiny_model import make_tiny

    from clipforge.caption.vocab import build_vocab
    from clipforge.train import coca
    from clipforge.train.config import CaptionConfig
    from clipforge.train.loss import ClipLoss
    from clipforge.train.step import forward_backward

    model = make_tiny(seed=3, lock_image=lock)
    g = torch.Generator().manual_seed(1)
    words = ["dog", "cat", "red", "ball", "grass", "runs", "a", "the", "man", "sky"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, 10, (2 + j % 5,), generator=g)) for j in range(12)
    ]
    ccfg = CaptionConfig(**{**SMALL_DECODER, "vocab_min_count": 1, "condition": condition})
    head = coca.CocaHead(build_vocab(texts, min_count=1), condition, ccfg, 2.0)
    model.add_module(
        coca.ATTR, coca.build_decoder(ccfg, len(head.vocab), 16 if condition == "embedding" else 128, 0)
    )
    model.eval()
    batch = {
        "image": {"pixels": torch.randn(12, 3, 16, 16, generator=g)},
        "text": dict(model.tokenize(texts)),
        "caption_tokens": head.tokens(texts),
    }

    def grads(accum):
        model.zero_grad(set_to_none=True)
        stats = {}
        loss = forward_backward(model, ClipLoss(), batch, accum, coca=head, stats=stats)
        return (
            loss.item(),
            stats["caption_loss"],
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )

    loss1, cap1, full = grads(1)
    assert any(n.startswith(coca.ATTR) for n in full)
    assert ("img_proj.0.weight" in full) and (("conv.0.weight" in full) == (not lock))
    for accum in (3, 4):
        loss, cap, acc = grads(accum)
        assert loss == pytest.approx(loss1, rel=1e-5) and cap == pytest.approx(cap1, rel=1e-5)
        assert acc.keys() == full.keys()
        for n in full:
            torch.testing.assert_close(acc[n], full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_coca_refuses_an_empty_vocabulary_and_fsdp(shards, tmp_path):
    kw = {"model": "py:tiny_model:make_tiny", "model_opts": {"lock_image": 1, "lock_text": 1}, "data": shards}
    cfg = _cfg(tmp_path / "run", **kw)
    cfg["caption"] = {**cfg["caption"], "vocab_min_count": 10_000}
    with pytest.raises(ConfigError, match="vocab_min_count"):
        train(cfg)
    with pytest.raises(ConfigError, match="fsdp"):
        TrainConfig.from_any({"data": ["a.tar"], "steps": 1, "loss": "coca", "fsdp": True})


# -- condition=spatial: the cross-attention decoder on the locked tower's spatial tokens ----------------
SPATIAL_KW = {"model": "py:tiny_model:make_tiny_scratch", "model_opts": {"lock_image": 1}}


def test_spatial_decoder_for_a_cached_run_reads_the_token_cache(shards, tmp_path):
    """With a locked tower and the feature cache, the spatial tokens are cached once (fp16, beside the
    feature cache), aligned with the cached samples and carried in their image features."""
    from types import SimpleNamespace

    from tiny_model import make_tiny_scratch

    from clipforge.caption.spatial import spatial_tokens
    from clipforge.train import coca
    from clipforge.train.cache import load_or_build_cache
    from clipforge.train.config import CaptionConfig
    from clipforge.train.data import CachedBatches

    model = make_tiny_scratch(lock_image=1)
    data, _ = load_or_build_cache(model, shards, tmp_path / ".feature_cache", workers=0, progress=False)
    source = CachedBatches(data, 8, model.tokenize, rank=0, world=1, seed=0, n_captions=1, all_captions=True)
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(caption=CaptionConfig(**SMALL_DECODER, condition="spatial"), seed=0, cache_dir=None,
                            cache_batch_size=8, workers=0),
        model=model, source=source, cached=True, urls=shards, out=tmp_path / "run", show=False,
        dist=SimpleNamespace(main=True), world=1,
    )  # fmt: skip
    dec = coca.decoder_for(trainer, "spatial", 40)
    n_tok = dec.cfg.cross_tokens
    assert dec.cfg.cross_dim == dec.cfg.cond_dim == 64 and n_tok > 1
    assert trainer.spatial_cache_dir.parent == tmp_path / ".feature_cache"
    assert len(list(trainer.spatial_cache_dir.glob("*.safetensors"))) == len(shards)
    batch = source.batch(0)
    tok = batch["image"][coca.SPATIAL_KEY]
    assert tok.shape == (8, n_tok, 64) and tok.dtype == torch.float32
    # row i of the batch holds the tokens of the batch's sample i (checked against the pixels' tokens)
    from clipforge.caption.spatial import shard_spatial_conditions

    direct = shard_spatial_conditions(model, shards, workers=0, fields=())
    pos = {k: i for i, k in enumerate(direct.keys)}
    want = direct.cond[[pos[k] for k in batch["keys"]]].float()
    torch.testing.assert_close(tok, want)
    head = coca.CocaHead(None, "spatial", trainer.cfg.caption, 2.0)
    assert head.condition_of(model, batch["image"], True, None) is tok
    px = torch.randn(2, 3, 32, 32)
    assert torch.equal(head.condition_of(model, {"pixels": px}, False, None), spatial_tokens(model, px))


def test_spatial_coca_uses_the_cache_keeps_the_contrastive_side_and_resumes_exactly(shards, tmp_path):
    kw = {**SPATIAL_KW, "data": shards, "steps": 8, "save_every": 3}
    spatial_caption = {**SMALL_DECODER, "condition": "spatial"}
    ref = train(_cfg(tmp_path / "ref", caption=spatial_caption, **kw))
    assert ref["mode"] == "cached"
    assert len(list((tmp_path / ".feature_cache").glob("spatial-*/*.safetensors"))) == len(shards)
    # exact resume: same losses and weights (decoder included) as the uninterrupted run
    with pytest.raises(_Crash):
        train(_cfg(tmp_path / "cut", caption=spatial_caption, **kw), _crash_at(5))
    train(_cfg(tmp_path / "cut", resume=True, caption=spatial_caption, **kw))
    cols = ("step", "loss", "contrastive_loss", "caption_loss")
    assert [[r[c] for c in cols] for r in _rows(tmp_path / "cut")] == [
        [r[c] for c in cols] for r in _rows(tmp_path / "ref")
    ]
    a = load_file(str(tmp_path / "ref" / "checkpoints/step-0000008/model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints/step-0000008/model.safetensors"))
    assert any(k.startswith("caption_decoder.blocks.0.kv_x") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the contrastive side trains exactly as a plain clip run
    clip = train(_cfg(tmp_path / "clip", **{**kw, "loss": "clip"}))
    assert clip["mode"] == "cached"
    assert [r["contrastive_loss"] for r in _rows(tmp_path / "ref")] == [
        r["loss"] for r in _rows(tmp_path / "clip")
    ]
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "clip" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the model dir embeds and captions through its cross-attention captioner
    from clipforge.caption.captioner import Captioner
    from clipforge.models import load_model

    cap = Captioner.load(tmp_path / "ref" / "model" / "captioner")
    assert cap.condition == "spatial" and cap.decoder.cfg.cross_dim == 64
    imgs = _images(shards[0], 3)
    greedy = DecodeOptions(method="greedy", min_len=1)
    loaded = load_model(str(tmp_path / "ref" / "model"), allow_code=True)
    caps = loaded.caption(imgs, greedy)
    assert len(caps) == 3 and all(c.strip() for c in caps)
    assert cap.caption_images(loaded, imgs, greedy) == caps


def test_spatial_coca_without_the_cache_reads_tokens_from_pixels(shards, tmp_path):
    r = train(_cfg(tmp_path / "run", caption={**SMALL_DECODER, "condition": "spatial"}, cache="off",
                   **{**SPATIAL_KW, "data": shards, "steps": 4}))  # fmt: skip
    assert r["mode"] == "streaming" and not list(tmp_path.glob(".feature_cache/spatial-*"))
    assert all(row["caption_loss"] > 0 for row in _rows(tmp_path / "run"))


def test_spatial_needs_a_locked_image_tower(shards, tmp_path):
    cfg = _cfg(tmp_path / "run", caption={**SMALL_DECODER, "condition": "spatial"}, model="scratch:vit-nano",
               data=shards)  # fmt: skip
    with pytest.raises(ConfigError, match="locked image tower"):
        train(cfg)
