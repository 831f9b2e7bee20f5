"""The one encode layer: autocast, length-sorted text batches, fingerprint, the shard loop."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.report import BadSampleReport
from clipforge.data.transforms import PreprocessConfig
from clipforge.models import encode as enc
from fake_clip import TinyClip, tiny_config


class _Tok:
    pad_token_id = 0

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[(ord(c) % 50) + 1 for c in t] or [51] for t in texts]
        n = max(len(i) for i in ids)
        x = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            x[r, : len(i)] = torch.tensor(i)
        return {"input_ids": x, "attention_mask": (x != 0).long()}


class Tiny(TinyClip):
    """The shared fake (tests/fake_clip.py) in its features split, counting text batches."""

    def __init__(self, dim: int = 8) -> None:
        torch.manual_seed(0)
        cfg = tiny_config(dim, 8, backend="scratch", preprocess=PreprocessConfig(size=8).to_dict())
        super().__init__(cfg, grid=2, vocab=64, split="features", seed=None, tokenizer=_Tok())
        self.batches: list[int] = []

    def text_features(self, tokens):
        self.batches.append(tokens["input_ids"].shape[0])
        return super().text_features(tokens)


def _shard(path: Path, n: int, bad: int = 0, bad_at: tuple[int, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
            data = b"broken" if i < bad or i in bad_at else buf.getvalue()
            members = {
                f"{i:04d}.png": data,
                f"{i:04d}.cls": str(i % 3).encode(),
                f"{i:04d}.txt": f"caption {i}".encode(),
                f"{i:04d}.json": json.dumps({"captions": [f"caption {i}"]}).encode(),
            }
            for name, b in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))
    return path


def test_autocast_one_signature():
    m = Tiny()
    assert isinstance(enc.autocast("fp32", m), type(enc.autocast("fp32", "cpu")))
    with enc.autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    with enc.autocast("bf16", m):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError):
        enc.autocast("fp16", "cpu")
    assert enc.resolve_precision(m, "auto") in ("fp32", "bf16")


def test_embed_texts_length_sorted_rows_in_input_order():
    m = Tiny()
    texts = ["a much longer caption here", "b", "mid size", "", "zz", "another long one!!"]
    out = enc.embed_texts(m, texts, batch_size=2)
    assert m.batches == [2, 2, 2] and out.dtype == np.float32 and out.shape == (6, 8)
    for i, t in enumerate(texts):  # each row equals the text embedded alone
        one = enc.embed_texts(m, [t])
        np.testing.assert_allclose(out[i], one[0], atol=1e-6)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert enc.embed_texts(m, []).shape == (0, 8)


def test_embed_texts_rank_split_and_gather():
    m = Tiny()
    texts = [f"text {'x' * i}" for i in range(7)]
    full = enc.embed_texts(m, texts, batch_size=3)
    order = enc.length_sorted(texts)
    other = (order[1::2], enc.embed_texts(m, [texts[i] for i in order[1::2]], batch_size=3))
    out0 = enc.embed_texts(m, texts, batch_size=3, rank=0, world=2, gather=lambda mine: [mine, other])
    np.testing.assert_allclose(out0, full, atol=1e-6)


def test_fingerprint_hashes_weights_and_config():
    a, b = Tiny(), Tiny()
    assert enc.fingerprint(a) == enc.fingerprint(b)
    with torch.no_grad():
        b.txt.weight[-1, -1] += 1e-3  # beyond any leading slice of the tensor
    assert enc.fingerprint(a) != enc.fingerprint(b)
    for p in a.img.parameters():
        p.requires_grad_(False)
    frozen = enc.fingerprint(a, frozen_only=True)
    with torch.no_grad():
        a.txt.weight += 1  # a trainable weight: the frozen-prefix identity is unchanged
    assert enc.fingerprint(a, frozen_only=True) == frozen
    c = Tiny(dim=8)
    c.config.embed_dim = 9
    assert enc.fingerprint(c) != enc.fingerprint(Tiny())


def test_row_buffer_grows_without_losing_rows():
    buf = enc.RowBuffer(np.float16)
    rows = [np.full((k, 3), k, np.float32) for k in (1, 4, 2, 9)]
    for r in rows:
        buf.append(r)
    np.testing.assert_array_equal(buf.array(), np.concatenate(rows).astype(np.float16))
    assert enc.RowBuffer().array(5).shape == (0, 5)


@pytest.mark.parametrize("workers", [0, 2])
def test_encode_shards_yields_keys_embeddings_fields_and_bad(tmp_path, workers):
    shards = [str(_shard(tmp_path / "a.tar", 7, bad=2)), str(_shard(tmp_path / "b.tar", 5))]
    m = Tiny()
    report = BadSampleReport()
    keys, embs, labels, bad = [], [], [], []
    for b in enc.encode_shards(m, shards, fields=("label",), batch_size=3, workers=workers, report=report):
        bad.extend(b.bad)
        if not b.keys:
            continue
        keys += b.keys
        embs.append(b.emb)
        labels += b.fields["label"].tolist()
    assert len(keys) == 10 and report.total == 2 and len(bad) == 2
    assert sorted(k for k, _, _ in bad) == ["0000", "0001"]
    emb = np.concatenate(embs)
    px = torch.stack([m.preprocess(Image.open(io.BytesIO(_png_of(tmp_path, k)))) for k in keys[:1]])
    np.testing.assert_allclose(emb[:1], enc.embed_pixels(m, px), atol=1e-5)
    assert labels == [int(k) % 3 for k in keys]


def _png_of(tmp_path: Path, key: str) -> bytes:
    for name in ("a.tar", "b.tar"):
        with tarfile.open(tmp_path / name) as tf:
            try:
                return tf.extractfile(f"{key}.png").read()
            except KeyError:
                continue
    raise KeyError(key)


def test_encode_shards_goes_through_shard_dataset(tmp_path, monkeypatch):
    """Workers die with their parent because the loop's dataset is a ShardDataset (which arranges it)."""
    from clipforge.data.dataset import ShardDataset

    seen = []
    real = enc.EncodeDataset.__init__

    def spy(self, *a, **kw):
        seen.append(isinstance(self, ShardDataset))
        real(self, *a, **kw)

    monkeypatch.setattr(enc.EncodeDataset, "__init__", spy)
    list(enc.encode_shards(Tiny(), [str(_shard(tmp_path / "a.tar", 2))], workers=0))
    assert seen == [True]


def test_encode_shards_limit_cuts_before_the_forward_and_reads_no_further(tmp_path):
    m = Tiny()
    shard = str(_shard(tmp_path / "a.tar", 12, bad=0))
    got = [b for b in enc.encode_shards(m, [shard], batch_size=4, workers=0, limit=6)]
    assert [len(b) for b in got] == [4, 2] and got[1].emb.shape[0] == 2
    report = BadSampleReport()  # sample 5 is bad but lies in the batch after the limit: never read
    later = str(_shard(tmp_path / "b.tar", 12, bad_at=(5,)))
    assert len(list(enc.encode_shards(m, [later], batch_size=4, workers=0, limit=4, report=report))) == 1
    assert report.total == 0


def test_workers_send_uint8_pixels_and_the_embeddings_are_bitwise_the_float_path(tmp_path):
    """Prepare with clipforge's transform ships uint8 pixels; the loop normalizes them in the consumer.
    The embeddings equal those of the per-image float transform exactly (not within a tolerance)."""
    m = Tiny()
    shard = str(_shard(tmp_path / "a.tar", 7))
    prep = enc.Prepare(m.preprocess)
    img = Image.open(io.BytesIO(_png_of(tmp_path, "0000"))).convert("RGB")
    px = prep({"image": img, "key": "0000", "shard": "a"})["pixels"]
    assert px.dtype == torch.uint8 and px.shape == (8, 8, 3)
    assert torch.equal(prep.finish(px.unsqueeze(0)), m.preprocess(img).unsqueeze(0))
    for workers in (0, 1):
        (b,) = list(enc.encode_shards(m, [shard], batch_size=7, workers=workers))
        floats = torch.stack([m.preprocess(Image.open(io.BytesIO(_png_of(tmp_path, k)))) for k in b.keys])
        assert np.array_equal(b.emb, enc.embed_pixels(m, floats))
    other = enc.Prepare(lambda im: torch.zeros(3, 2, 2))  # any other transform: floats, passed through
    assert other({"image": img, "key": "k", "shard": "a"})["pixels"].dtype == torch.float32
    assert other.finish(torch.zeros(1, 3, 2, 2)).dtype == torch.float32
