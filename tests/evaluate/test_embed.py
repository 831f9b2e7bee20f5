"""Embedding: canonical order regardless of workers, bad samples counted, texts in input order."""

from __future__ import annotations

import pytest
import torch
from evalutils import write_color_shards

from clipforge.evaluate.embed import embed_images, embed_texts


def test_order_independent_of_workers(tiny_model, color_shards) -> None:
    shards, _ = color_shards
    spec = [str(s) for s in shards]
    a = embed_images(tiny_model, spec, labels=True, captions=True, workers=0, batch_size=5, progress=False)
    b = embed_images(tiny_model, spec, labels=True, captions=True, workers=2, batch_size=7, progress=False)
    assert a.keys == sorted(a.keys) and a.keys == b.keys  # shard 0's keys sort before shard 1's
    assert len(a) == 2 * 17 and a.bad.total == 2 and b.bad.total == 2
    assert torch.allclose(a.emb, b.emb, atol=1e-6) and torch.equal(a.labels, b.labels)
    assert a.captions == b.captions and all(len(c) == 2 for c in a.captions)
    assert a.shards[0] == "color-000000.tar" and a.shards[-1] == "color-000001.tar"
    assert torch.allclose(a.emb.norm(dim=-1), torch.ones(len(a)), atol=1e-5)


def test_image_size_override(tiny_model, color_shards) -> None:
    shards, _ = color_shards
    a = embed_images(tiny_model, [str(shards[0])], workers=0, progress=False, image_size=8)
    b = embed_images(tiny_model, [str(shards[0])], workers=0, progress=False)
    assert a.emb.shape == b.emb.shape and not torch.allclose(a.emb, b.emb)


def test_all_bad_is_a_clear_error(tiny_model, tmp_path) -> None:
    shards, _ = write_color_shards(tmp_path, n_shards=1, per_shard=3, corrupt=3)
    with pytest.raises(ValueError, match="no decodable images"):
        embed_images(tiny_model, [str(shards[0])], workers=0, progress=False)


def test_texts_keep_input_order(tiny_model) -> None:
    texts = ["a much longer caption with many words in it", "short", "medium length text", "x y"]
    got = embed_texts(tiny_model, texts, batch_size=2, progress=False)
    want = torch.cat([tiny_model.encode_text(tiny_model.tokenize([t])) for t in texts])
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError):
        embed_texts(tiny_model, [], progress=False)


def test_bf16_precision_is_close_and_validated(tiny_model, color_shards) -> None:
    shards, _ = color_shards
    texts = ["a red square", "picture of something blue", "green"]
    a = embed_texts(tiny_model, texts, progress=False)
    b = embed_texts(tiny_model, texts, precision="bf16", progress=False)
    assert (a * b).sum(-1).min() > 0.98
    with pytest.raises(ValueError, match="precision"):
        embed_images(tiny_model, [str(shards[0])], precision="fp8", workers=0, progress=False)
