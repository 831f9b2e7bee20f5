"""``caption run --engine ray``: the same per-shard side tables, byte for byte, as the local engine, and
resumable per shard across engines (local Ray, 2 CPUs, a small flickr8k slice)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from caption_testutils import slice_shard, tiny_clip

from clipforge.caption.captioner import Captioner, encoder_fingerprint
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
from clipforge.caption.run import CaptionRunConfig, run_captions
from clipforge.caption.vocab import build_vocab
from clipforge.config import ConfigError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    os.environ.get("CLIPFORGE_RAY_PROCESS") != "1",
    reason="run in their own process by tests/test_ray_process.py (Ray's threads make later forks unsafe)",
)
ENC = "py:caption_testutils:tiny_clip"


@pytest.fixture(scope="module")
def ray_local():
    import caption_testutils

    import fake_clip

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for m in (fake_clip, caption_testutils):  # test model classes (and their shared base) travel by value
        ray.cloudpickle.register_pickle_by_value(m)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """Three small shards (one with an undecodable sample) and an (untrained, seeded) captioner."""
    d = tmp_path_factory.mktemp("ray_slice")
    fl = shared_data / "flickr8k"
    shards = [
        str(slice_shard(fl / "train-000000.tar", d / "a.tar", 5, corrupt="zz_broken")),
        str(slice_shard(fl / "train-000001.tar", d / "b.tar", 4)),
        str(slice_shard(fl / "test-000000.tar", d / "c.tar", 3)),
    ]
    vocab = build_vocab(["a dog runs on grass", "a man in a red shirt", "two kids play"], min_count=1)
    torch.manual_seed(0)
    dec = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), cond_dim=16, width=32, heads=2, layers=1))
    enc = tiny_clip()
    meta = {"mode": "paired", "encoder": {"model": ENC, "condition": "embedding", "model_opts": {},
            "fingerprint": encoder_fingerprint(enc, "embedding")}}  # fmt: skip
    Captioner(dec.eval(), vocab, meta).save(d / "cap")
    return shards, str(d / "cap")


def _cfg(setup, out, **kw) -> dict:
    shards, cap = setup
    return {"captioner": cap, "data": shards, "output": str(out), "encoder": ENC, "workers": 0, "threads": 1,
            "batch_size": 4, "decode": {"method": "beam", "num_candidates": 2}, **kw}  # fmt: skip


def _files(out) -> dict[str, bytes]:
    """The per-shard files; a bad-sample detail may hold an object address (PIL's "<_io.BytesIO object
    at 0x...>"), different in every process, so those are masked."""
    return {p.name: _no_addr(p.read_bytes()) for p in sorted((out / "captions").iterdir())}


def _no_addr(b):
    return (
        re.sub(rb" at 0x[0-9a-f]+", b" at 0x", b)
        if isinstance(b, bytes)
        else json.loads(_no_addr(json.dumps(b).encode()))
    )


def test_ray_writes_the_local_engine_s_tables_byte_for_byte(ray_local, setup, tmp_path):
    loc = run_captions(_cfg(setup, tmp_path / "local"), progress=False)
    rs = run_captions(_cfg(setup, tmp_path / "ray", engine="ray", write_shards=True), progress=False)
    assert rs["engine"] == "ray" and loc["engine"] == "local"
    assert rs["captions"] == loc["captions"] == 12 and rs["shards_done"] == 3
    assert _no_addr(rs["bad_samples"]) == _no_addr(loc["bad_samples"]) and rs["bad_samples"]["total"] == 1
    a, b = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 6  # 3 tables + 3 bad-sample files
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    tables = [k for k in a if k.endswith(".parquet")]
    assert len(tables) == 3 and all(  # the side tables themselves: byte for byte, unmasked
        (tmp_path / "local" / "captions" / k).read_bytes() == (tmp_path / "ray" / "captions" / k).read_bytes()
        for k in tables
    )
    assert len(list((tmp_path / "ray" / "shards").glob("*.tar"))) == 3


def test_ray_resumes_per_shard_and_across_engines(ray_local, setup, tmp_path):
    out = tmp_path / "run"
    first = run_captions(_cfg(setup, out), progress=False)  # local
    before = _files(out)
    (out / "captions" / "b.parquet").unlink()  # as if killed before this shard's table was written
    again = run_captions(_cfg(setup, out, engine="ray"), resume=True, progress=False)
    assert again["shards_skipped_resume"] == 2 and again["shards_done"] == 1 and again["captions"] == 4
    assert again["bad_samples"] == first["bad_samples"]  # the skipped shards' bad sample still counts
    assert _files(out) == before


def test_engine_is_checked():
    with pytest.raises(ConfigError, match="engine"):
        CaptionRunConfig(engine="spark").validate()
