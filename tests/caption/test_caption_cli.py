"""End to end on a flickr8k slice: ``caption train`` (exact resume), ``caption run`` (side table, bad
samples, resume), ``caption eval`` (metrics + baselines), text-only mode; through ``caption.cli.register``.

The encoder is a tiny deterministic CLIP (``py:caption_testutils:tiny_clip``) so the slice trains in
seconds; Java-based scoring is checked in test_caption_metrics.py, here the simple tokenizer keeps the
run bounded.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pyarrow.parquet as pq
import pytest
from caption_testutils import slice_shard
from safetensors.torch import load_file

from clipforge.caption import metrics
from clipforge.caption.captioner import Captioner
from clipforge.caption.cli import register

pytestmark = pytest.mark.slow

ENC = ["--encoder", "py:caption_testutils:tiny_clip"]  # a py: spec saved in a file is never run by itself
TINY = ["--model", "py:caption_testutils:tiny_clip", "--threads", "1", "--workers", "0", "--min-count", "1"]
DECODER = [
    "--decoder.layers",
    "1",
    "--decoder.width",
    "32",
    "--decoder.heads",
    "2",
    "--decoder.dropout",
    "0.1",
]
STEPS = ["--batch-size", "16", "--warmup", "5", "--log-every", "5", "--ckpt-every", "10", "--keep", "5"]


@pytest.fixture(scope="module")
def slices(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("flickr_slice")
    fl = shared_data / "flickr8k"
    train = [slice_shard(fl / f"train-00000{i}.tar", d / f"train-{i}.tar", 12) for i in (0, 1)]
    test = slice_shard(fl / "test-000000.tar", d / "test.tar", 6, corrupt="zz_broken")
    return [str(p) for p in train], str(test)


def cli(args: list[str], capsys) -> tuple[int, dict]:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["caption", *args, "--json"])
    rc = a.func(a)
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


@pytest.fixture(scope="module")
def trained(slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    from clipforge.caption.train import train_captioner

    cfg = {"data": slices[0], "output": str(out), "model": "py:caption_testutils:tiny_clip", "threads": 1,
           "workers": 0, "min_count": 1, "max_steps": 30, "batch_size": 16, "warmup": 5, "log_every": 5,
           "ckpt_every": 10, "keep": 5, "decoder": {"layers": 1, "width": 32, "heads": 2, "dropout": 0.1}}  # fmt: skip
    return train_captioner(cfg, progress=False), out


def test_train_cli_and_exact_resume(slices, trained, tmp_path, capsys):
    summary, a = trained
    assert summary["steps"] == 30 and summary["train_images"] == 24 and summary["condition"] == "features"
    for f in (
        "metrics.jsonl",
        "curves.png",
        "config.yaml",
        "captioner/vocab.json",
        "captioner/model.safetensors",
        "captioner/consensus.safetensors",
    ):
        assert (a / f).exists(), f
    memory = Captioner.load(a / "captioner").consensus
    assert memory is not None and len(memory.captions) == 24 and memory.vectors.shape[0] == 24
    # a copy of run a cut back to its step-10 checkpoint, resumed through the CLI, ends bit-identical
    b = a.parent / "b"
    shutil.copytree(a, b)
    for step in (20, 30):
        shutil.rmtree(b / "checkpoints" / f"step-{step:07d}")
    (b / "checkpoints" / "latest").write_text("step-0000010\n")
    shutil.rmtree(b / "captioner")
    rc, res = cli(["train", "--data", *slices[0], "--output", str(b), *TINY, *DECODER, *STEPS,
                   "--max-steps", "30", "--resume"], capsys)  # fmt: skip
    assert rc == 0 and res["steps"] == 30
    wa, wb = (
        load_file(str(a / "captioner/model.safetensors")),
        load_file(str(b / "captioner/model.safetensors")),
    )
    assert all((wa[k] == wb[k]).all() for k in wa)
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(a)] == [r["loss"] for r in rows(b)]
    # an existing run without --resume/--overwrite is refused with a clear message
    rc, res = cli(["train", "--data", *slices[0], "--output", str(b), *TINY, "--max-steps", "2"], capsys)
    assert rc == 2 and "--overwrite" in res["error"]


def test_run_writes_side_table_counts_bad_and_resumes(slices, trained, tmp_path, capsys):
    cap = str(trained[1] / "captioner")
    out = tmp_path / "recap"
    args = ["run", "--captioner", cap, "--data", slices[1], "--output", str(out), "--workers", "0",
            "--decode.method", "beam", *ENC]  # fmt: skip
    rc, s = cli(args, capsys)
    assert rc == 0 and s["captions"] == 6 and s["shards_done"] == 1
    assert s["bad_samples"]["total"] == 1 and "zz_broken" in json.dumps(s["bad_samples"]["keys"])
    t = pq.read_table(out / "captions" / "test.parquet").to_pylist()
    assert len(t) == 6 and all(r["caption_synthetic"] and r["caption_original"] for r in t)
    assert {"clip_score_original", "clip_score_synthetic", "decoding", "scoring_model"} <= set(t[0])
    assert t[0]["decoding"].startswith("beam w=3")
    rc, s = cli([*args, "--decode.num-candidates", "3", "--output", str(tmp_path / "k3")], capsys)
    assert rc == 0
    for r in pq.read_table(tmp_path / "k3" / "captions" / "test.parquet").to_pylist():
        assert len(r["caption_candidates"]) == 3 and r["caption_synthetic"] in r["caption_candidates"]
    rc, s = cli([*args, "--decode.rerank", "consensus", "--decode.rerank-k", "3", "--output", str(tmp_path / "rr")],
                capsys)  # fmt: skip
    assert rc == 0 and s["captions"] == 6
    t = pq.read_table(tmp_path / "rr" / "captions" / "test.parquet").to_pylist()
    assert "rerank=consensus k=3" in t[0]["decoding"] and all(r["caption_synthetic"] for r in t)
    rc, s = cli([*args, "--resume"], capsys)
    assert rc == 0 and s["shards_skipped_resume"] == 1 and s["shards_done"] == 0
    assert s["bad_samples"]["total"] == 1  # the resumed shard's bad sample still counts
    rc, s = cli(args, capsys)
    assert rc == 2 and "--overwrite" in s["error"]
    no_enc = [a for a in args if a not in ENC]
    rc, s = cli([*no_enc[:-4], "--output", str(tmp_path / "other")], capsys)
    assert rc == 2 and "--encoder" in s["error"]  # the saved py: spec is not run


def test_memory_command_adds_the_consensus_memory(slices, trained, tmp_path, capsys):
    """A captioner without a memory (trained before it existed) gets the one training would have saved."""
    d = tmp_path / "cap"
    shutil.copytree(trained[1] / "captioner", d)
    want = Captioner.load(d).consensus
    (d / "consensus.safetensors").unlink()
    assert Captioner.load(d).consensus is None
    rc, s = cli(["memory", "--captioner", str(d), "--data", *slices[0], "--workers", "0", *ENC], capsys)
    assert rc == 0 and s["images"] == 24 and s["entries"] == 24 and s["without_captions"] == 0
    got = Captioner.load(d).consensus
    assert sorted(map(tuple, got.captions)) == sorted(map(tuple, want.captions))
    order = {tuple(c): i for i, c in enumerate(want.captions)}  # same images, maybe another order
    idx = [order[tuple(c)] for c in got.captions]
    assert (got.vectors.float() - want.vectors[idx].float()).abs().max() < 2e-2  # fp16 cache vs fresh
    rc, s = cli(["memory", "--captioner", str(d), "--data", str(tmp_path / "none.tar"), *ENC], capsys)
    assert rc == 2 and "error" in s


def test_eval_reports_metrics_and_baselines(slices, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    rc, r = cli(["eval", "--captioner", str(trained[1] / "captioner"), "--data", slices[1], "--knn-k", "5", *ENC,
                 "--decode.method", "greedy", "--output", str(tmp_path / "res.json")], capsys)  # fmt: skip
    assert rc == 0
    tasks = [x["task"] for x in r["results"]]
    assert tasks == ["captioning", "captioning/constant", "captioning/nearest", "captioning/knn_consensus_k5"]
    m = r["results"][0]["metrics"]
    for k in (
        "bleu4",
        "cider_d",
        "rouge_l",
        "clip_score",
        "ref_clip_score",
        "self_r@1",
        "novel_share",
        "distinct",
    ):
        assert k in m, k
    assert m["comparable"] is False and "meteor" not in m  # java hidden: marked, never 0
    assert r["results"][0]["scoring_model_is_encoder"] is True
    assert json.loads((tmp_path / "res.json").read_text())["results"][0]["task"] == "captioning"


@pytest.mark.parametrize("cache", ["--feature-cache", "--no-feature-cache"])
def test_text_only_mode_stores_memory_and_projects(slices, tmp_path, capsys, cache):
    out = tmp_path / "textonly"
    rc, s = cli(["train", "--mode", "text-only", "--data", *slices[0], "--output", str(out), *TINY, *DECODER,
                 *STEPS, "--max-steps", "10", "--decap-temperature", "0.05", cache], capsys)  # fmt: skip
    assert rc == 0 and s["condition"] == "embedding" and s["mode"] == "text-only"
    assert (s["feature_cache"] is None) == (cache == "--no-feature-cache")
    cap = Captioner.load(out / "captioner")
    assert cap.memory is not None and cap.memory.shape[0] == 24 * 5  # every training caption
    assert cap.consensus is not None and len(cap.consensus.captions) == 24 * 5  # each caption votes alone
    assert cap.consensus.captions[0] == [cap.consensus.captions[0][0]]
    rc, r = cli(["run", "--captioner", str(out / "captioner"), "--data", slices[1], "--output",
                 str(tmp_path / "r"), "--workers", "0", "--scoring-model", "none", "--decap-temperature", "0", *ENC],
                capsys)  # fmt: skip
    assert rc == 0 and r["captions"] == 6
    t = pq.read_table(tmp_path / "r" / "captions" / "test.parquet").to_pylist()
    assert t[0]["decoding"].endswith("decap=0") and "clip_score_synthetic" not in t[0]


def test_run_write_shards_keeps_the_original_in_json(slices, trained, tmp_path, capsys):
    from clipforge.data.reader import iter_tar_samples

    out = tmp_path / "recap"
    rc, s = cli(["run", "--captioner", str(trained[1] / "captioner"), "--data", slices[1], "--output", str(out),
                 "--workers", "0", "--scoring-model", "none", "--write-shards", *ENC], capsys)  # fmt: skip
    assert rc == 0 and s["captions"] == 6
    table = {r["key"]: r for r in pq.read_table(out / "captions" / "test.parquet").to_pylist()}
    samples = list(iter_tar_samples(str(out / "shards" / "test-000.tar")))
    assert sorted(x["__key__"] for x in samples) == sorted(table)  # the broken sample is not copied
    for x in samples:
        meta = json.loads(x["json"])
        row = table[x["__key__"]]
        assert x["txt"].decode() == row["caption_synthetic"] == meta["caption_synthetic"]
        assert meta["caption_original"] == row["caption_original"]
        assert meta["captions"] == [row["caption_synthetic"]] and len(meta["captions_original"]) == 5
        assert "jpg" in x


def test_caption_images_matches_the_shard_path(slices, trained):
    """PIL uploads (the server's path) get the same captions as the same images read from shards."""
    import io

    from PIL import Image

    from clipforge.caption.decoding import DecodeOptions
    from clipforge.caption.features import shard_conditions
    from clipforge.data.reader import iter_tar_samples

    cap = Captioner.load(trained[1] / "captioner")
    enc = cap.load_encoder("py:caption_testutils:tiny_clip")
    opts = DecodeOptions(method="greedy")
    cond = shard_conditions(enc, slices[0][0], cap.condition, workers=0)
    images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in iter_tar_samples(slices[0][0])][:4]
    assert cap.caption_images(enc, images, opts) == cap.caption(cond.cond[:4], opts)[0]


def test_cpu_budget_stops_training(slices, tmp_path, capsys):
    rc, s = cli(["train", "--data", *slices[0], "--output", str(tmp_path / "budget"), *TINY, *DECODER, *STEPS,
                 "--max-steps", "100000", "--cpu-budget-minutes", "0.02", "--precision", "bf16"], capsys)  # fmt: skip
    assert rc == 0 and 0 < s["steps"] < 100000 and s["train_cpu_s"] >= 1.2
    assert (tmp_path / "budget" / "captioner" / "model.safetensors").exists()


def test_wall_budget_stops_training(slices, tmp_path, capsys):
    rc, s = cli(["train", "--data", *slices[0], "--output", str(tmp_path / "wall"), *TINY, *DECODER, *STEPS,
                 "--max-steps", "100000", "--wall-budget-minutes", "0.02"], capsys)  # fmt: skip
    assert rc == 0 and 0 < s["steps"] < 100000
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "wall" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] < 0.2 * max(lrs)  # the cosine ran down over the wall budget
