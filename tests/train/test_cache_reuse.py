"""Shards made from other shards (curate filter/fix, reshard) are assembled from the cached rows of
identical images: no second pass of the frozen tower, their own captions, and a full pass wherever an
image is new or anything in the shard would be a reported bad sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from tiny_model import make_tiny

from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.train import cache as cache_mod
from clipforge.train.cache import load_or_build_cache


def _write(path: Path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if ext in s:
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(s[ext])
                    tf.addfile(info, io.BytesIO(s[ext]))
    return str(path)


def _recaption(s: dict, caption: str) -> dict:
    """What ``curate fix`` writes: the same image bytes, a new KEY.txt and KEY.json captions."""
    meta = {**json.loads(s["json"]), "captions": [caption]}
    return {**s, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def _count_passes(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = cache_mod.compute_shards

    def counted(model, urls, **kw):
        calls.append(list(urls))
        return real(model, urls, **kw)

    monkeypatch.setattr(cache_mod, "compute_shards", counted)
    return calls


def test_subset_shard_reuses_image_rows_with_its_own_captions(flickr_slice, tmp_path, monkeypatch):
    model = make_tiny(lock_image=1, lock_text=1).eval()
    root = tmp_path / "cache"
    src, _ = load_or_build_cache(model, flickr_slice, root, workers=0, batch_size=16, progress=False)
    calls = _count_passes(monkeypatch)
    encoded: list[str] = []
    real_texts = cache_mod._encode_texts
    monkeypatch.setattr(
        cache_mod, "_encode_texts", lambda m, caps, *a: encoded.extend(caps) or real_texts(m, caps, *a)
    )

    # a "fixed" shard: samples of two source shards, in another order, half of them recaptioned
    picked = list(iter_tar_samples(flickr_slice[0]))[3:9] + list(iter_tar_samples(flickr_slice[1]))[:4]
    picked = picked[::-1]
    new = [_recaption(s, f"a new caption {i}") if i % 2 else s for i, s in enumerate(picked)]
    fixed = _write(tmp_path / "fixed-000000.tar", new)
    report = BadSampleReport()
    data, _ = load_or_build_cache(
        model, [fixed], root, workers=0, batch_size=16, report=report, progress=False
    )

    assert calls == []  # no pass over the images
    assert sorted(encoded) == sorted(f"a new caption {i}" for i in range(1, len(new), 2))  # only new texts
    assert data.keys == [s["__key__"] for s in new] and report.total == 0
    for i, s in enumerate(new):
        j = src.keys.index(s["__key__"])
        torch.testing.assert_close(data.image["pooled"][i], src.image["pooled"][j], rtol=0, atol=0)
        if i % 2:
            assert data.captions[i] == [f"a new caption {i}"]
        else:  # an unchanged caption keeps its source row's text features, bit for bit
            assert data.captions[i] == src.captions[j]
            c = torch.tensor([[len(src.captions[j]) - 1]])
            got = data.text_rows(torch.tensor([i]), c)["pooled"]
            torch.testing.assert_close(got, src.text_rows(torch.tensor([j]), c)["pooled"], rtol=0, atol=0)
    # text features of a new caption: the locked text tower on that caption
    with torch.no_grad():
        want = model.text_features(model.tokenize(["a new caption 1"]))["pooled"][0]
    got = data.text_rows(torch.tensor([1]), torch.tensor([[0]]))["pooled"][0]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)

    # the assembled shard is itself a source for the next derived shard
    again = _write(tmp_path / "again-000000.tar", new[:3])
    load_or_build_cache(model, [again], root, workers=0, batch_size=16, progress=False)
    assert calls == []


def test_a_new_image_or_a_bad_sample_takes_the_full_pass(flickr_slice, tmp_path, monkeypatch):
    model = make_tiny(lock_image=1, lock_text=0).eval()  # image-only cache: no text features
    root = tmp_path / "cache"
    load_or_build_cache(model, flickr_slice, root, workers=0, batch_size=16, progress=False)
    calls = _count_passes(monkeypatch)
    samples = list(iter_tar_samples(flickr_slice[0]))[:5]

    edited = [dict(s) for s in samples]
    edited[2]["jpg"] = edited[2]["jpg"] + b"\0"  # other bytes (same pixels): a new image
    one_new = _write(tmp_path / "new-000000.tar", edited)
    # the source's corrupt image (never cached) rides along: it must be reported, not silently dropped
    corrupt = list(iter_tar_samples(flickr_slice[-1]))[1]
    assert corrupt["jpg"] == b"not a jpeg"
    with_bad = _write(tmp_path / "bad-000000.tar", samples + [corrupt])
    no_caption = _write(
        tmp_path / "nocap-000000.tar", samples[:2] + [{"__key__": "x", "jpg": samples[0]["jpg"]}]
    )
    report = BadSampleReport()
    data, _ = load_or_build_cache(
        model, [one_new, with_bad, no_caption], root, workers=0, batch_size=16, report=report, progress=False
    )
    assert sorted(calls[0]) == sorted([one_new, with_bad, no_caption]) and len(calls) == 1
    assert report.counts["corrupt_image"] == 1 and report.total == 2  # + the sample without a caption
    assert len(data) == 5 + 5 + 2


def test_duplicate_keys_are_never_a_reuse_source(tmp_path):
    samples = [
        {"__key__": "k", "jpg": b"one", "txt": b"a"},
        {"__key__": "j", "jpg": b"mid", "txt": b"c"},
        {"__key__": "k", "jpg": b"two", "txt": b"b"},  # the same key again, apart: the reader yields both
    ]
    scan = cache_mod.scan_shard(_write(tmp_path / "dup-000000.tar", samples))
    assert scan["keys"] == ["k", "j", "k"] and not scan["clean"]
    assert cache_mod._digests_by_key(scan) == {"k": None, "j": cache_mod.image_digest(b"mid")}
    one = cache_mod.scan_shard(_write(tmp_path / "one-000000.tar", samples[:1]))
    assert one["clean"] and cache_mod._digests_by_key(one) == {"k": cache_mod.image_digest(b"one")}
