"""``caption run`` outputs: shards written with --write-shards train on the synthetic caption only (KEY.json
``captions`` too, the originals kept beside it), and the side table keeps the plain cosine next to the
CLIPScore (which clamps every poor caption to 0)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from caption_testutils import slice_shard

from clipforge.caption.run import run_captions

pytestmark = pytest.mark.slow
ENC = "py:caption_testutils:tiny_clip"


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    from clipforge.caption.train import train_captioner

    d = tmp_path_factory.mktemp("run_outputs")
    fl = shared_data / "flickr8k"
    train = str(slice_shard(fl / "train-000000.tar", d / "train.tar", 12))
    test = str(slice_shard(fl / "test-000000.tar", d / "test.tar", 6, corrupt="zz_broken"))
    cfg = {"data": [train], "output": str(d / "cap"), "model": ENC, "threads": 1, "workers": 0, "min_count": 1,
           "max_steps": 20, "batch_size": 16, "warmup": 5, "log_every": 5, "ckpt_every": 10, "keep": 2,
           "decoder": {"layers": 1, "width": 32, "heads": 2, "dropout": 0.1}}  # fmt: skip
    train_captioner(cfg, progress=False)
    return str(d / "cap" / "captioner"), test


def _run(setup, out, **kw):
    cap, test = setup
    cfg = {"captioner": cap, "data": [test], "output": str(out), "encoder": ENC, "workers": 0, **kw}
    return run_captions(cfg, progress=False)


def test_write_shards_sets_json_captions_to_the_synthetic_one(setup, tmp_path):
    from clipforge.data.reader import iter_tar_samples

    s = _run(setup, tmp_path / "r", write_shards=True, scoring_model="none")
    assert s["captions"] == 6
    table = {r["key"]: r for r in pq.read_table(tmp_path / "r" / "captions" / "test.parquet").to_pylist()}
    originals = {x["__key__"]: json.loads(x["json"]) for x in iter_tar_samples(setup[1]) if "json" in x}
    samples = list(iter_tar_samples(str(tmp_path / "r" / "shards" / "test-000.tar")))
    assert sorted(x["__key__"] for x in samples) == sorted(table)
    for x in samples:
        meta, row = json.loads(x["json"]), table[x["__key__"]]
        assert x["txt"].decode() == row["caption_synthetic"] == meta["caption_synthetic"]
        assert meta["captions"] == [row["caption_synthetic"]]  # the trainer reads every JSON caption
        assert meta["captions_original"] == originals[x["__key__"]]["captions"]
        assert len(meta["captions_original"]) == 5
        assert meta["caption_original"] == row["caption_original"]
        assert meta["image_id"] == originals[x["__key__"]]["image_id"]  # the rest of KEY.json is kept


def test_side_table_keeps_the_plain_cosine(setup, tmp_path):
    from clipforge.caption.metrics import CLIPSCORE_W
    from clipforge.models import load_model

    _run(setup, tmp_path / "k", **{"decode": {"method": "beam", "num_candidates": 3}})
    rows = pq.read_table(tmp_path / "k" / "captions" / "test.parquet").to_pylist()
    model = load_model(ENC, allow_code=True)
    for r in rows:
        for side in ("original", "synthetic"):
            cos, clip_s = r[f"clip_cosine_{side}"], r[f"clip_score_{side}"]
            assert -1.0 <= cos <= 1.0 and 0.0 <= clip_s <= CLIPSCORE_W
        cands = r["caption_candidates"]
        assert len(r["clip_cosine_candidates"]) == len(cands) == 3
        j = cands.index(r["caption_synthetic"])
        assert r["clip_cosine_candidates"][j] == pytest.approx(r["clip_cosine_synthetic"], abs=1e-5)
    # the cosine of the caption as written is curation's clip score (so a curate cut applies to it)
    from clipforge.curate.config import CurateConfig
    from clipforge.curate.engine import run_curation

    run_curation([setup[1]], tmp_path / "cur", CurateConfig(stages=["clip-score"], model=ENC), model=model,
                 progress=False)  # fmt: skip
    cur = pq.read_table(tmp_path / "cur" / "scores.parquet").to_pylist()
    by_key = {c["key"]: c["clip_score"] for c in cur}
    for r in rows:
        assert r["clip_cosine_original"] == pytest.approx(by_key[r["key"]], abs=1e-4)
