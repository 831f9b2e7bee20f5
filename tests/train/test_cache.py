"""Locked-tower feature cache: equals recomputation, all captions kept, reused, keyed by config."""

from __future__ import annotations

import json

import torch
from tiny_model import make_tiny

from clipforge.data.report import BadSampleReport
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.train import cache as cache_mod
from clipforge.train.cache import fingerprint, load_or_build_cache


def test_cache_matches_recompute_and_is_reused(flickr_slice, tmp_path, monkeypatch):
    model = make_tiny(lock_image=1, lock_text=1).eval()
    report = BadSampleReport()
    data, root = load_or_build_cache(
        model, flickr_slice, tmp_path / "cache", workers=1, batch_size=16, report=report, progress=False
    )
    assert len(data) == 95 and report.counts["corrupt_image"] == 1
    assert data.text_cached and int(data.caption_counts.sum()) == 5 * 95  # all 5 flickr captions each
    # features equal a direct recomputation (float16 storage tolerance)
    from clipforge.data.reader import iter_tar_samples

    raw = next(iter_tar_samples(flickr_slice[0]))
    i = data.keys.index(raw["__key__"])
    from clipforge.data.decode import decode_sample

    s = decode_sample(raw)
    px = ImageTransform(PreprocessConfig.from_dict(model.config.preprocess))(s["image"])[None]
    with torch.no_grad():
        want = model.image_features(px)["pooled"][0]
        caps = json.loads(raw["json"])["captions"]
        want_t = model.text_features(model.tokenize([caps[2]]))["pooled"][0]
    torch.testing.assert_close(data.image["pooled"][i].float(), want, rtol=2e-3, atol=2e-3)
    j = data.captions[i].index(caps[2])
    got_t = data.text_rows(torch.tensor([i]), torch.tensor([[j]]))["pooled"][0]
    torch.testing.assert_close(got_t, want_t, rtol=2e-3, atol=2e-3)

    # second run: nothing recomputed, same bad-sample counts
    def boom(*a, **k):
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(cache_mod, "compute_shards", boom)
    report2 = BadSampleReport()
    data2, root2 = load_or_build_cache(
        model, flickr_slice, tmp_path / "cache", report=report2, progress=False
    )
    assert root2 == root and data2.keys == data.keys and report2.counts["corrupt_image"] == 1
    torch.testing.assert_close(data2.image["pooled"], data.image["pooled"])


def test_fingerprint_tracks_what_changes_features():
    a, b = make_tiny(lock_image=1, lock_text=1), make_tiny(lock_image=1, lock_text=1)
    assert fingerprint(a, True) == fingerprint(b, True)
    assert fingerprint(a, True) != fingerprint(a, False)
    c = make_tiny(lock_image=1, lock_text=1, size=24)  # other preprocessing
    assert fingerprint(c, True) != fingerprint(a, True)
    with torch.no_grad():
        b.conv[0].weight.add_(0.01)  # other frozen weights
    assert fingerprint(b, True) != fingerprint(a, True)
    with torch.no_grad():  # trainable head weights do not matter
        a.img_proj[0].weight.add_(1.0)
    assert fingerprint(a, True) == fingerprint(make_tiny(lock_image=1, lock_text=1), True)


def test_cache_key_is_the_one_model_identity(monkeypatch):
    """The feature cache, the index and the class-embedding cache agree on "the same model"."""
    from clipforge.models import encode

    a = make_tiny(lock_image=1, lock_text=1)
    before = (fingerprint(a, True), encode.fingerprint(a, frozen_only=True))
    frozen = [p for p in a.parameters() if not p.requires_grad]
    with torch.no_grad():
        max(frozen, key=lambda p: p.numel()).view(-1)[-1] += 1e-3  # past any leading slice of the tensor
    after = (fingerprint(a, True), encode.fingerprint(a, frozen_only=True))
    assert before[0] != after[0] and before[1] != after[1]
    monkeypatch.setattr(encode, "fingerprint", lambda model, frozen_only=False: "same")
    assert fingerprint(a, True) == fingerprint(make_tiny(lock_image=1, lock_text=1, size=24), True)


def test_stale_tmp_of_a_killed_run_is_cleaned_young_kept(tmp_path):
    import os
    import time

    old, young = tmp_path / ".a.safetensors.x.tmp", tmp_path / ".b.safetensors.y.tmp"
    old.write_bytes(b"half")
    young.write_bytes(b"being written")
    past = time.time() - 2 * cache_mod.STALE_TMP_S
    os.utime(old, (past, past))
    assert cache_mod.clean_stale_tmp(tmp_path) == 1
    assert not old.exists() and young.exists()
