"""Text sources (raw | synthetic | mix:P | multi | rewrites:K) from Parquet side tables keyed by sample key:
each mode picks what it should, seeded by (seed, epoch, key), in cached and streaming training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny

from clipforge.config import ConfigError, from_dict
from clipforge.data.reader import iter_tar_samples
from clipforge.data.shards import shard_name
from clipforge.train.config import TrainConfig
from clipforge.train.hooks import TrainHooks
from clipforge.train.loop import fit
from clipforge.train.textsource import SideTexts, TextChooser, TextSource, split_sentences

MISSING = 3  # keys of the first shard left out of the side table


def slice_keys(shards: list[str]) -> list[tuple[str, str]]:
    return [(shard_name(u), s["__key__"]) for u in shards for s in iter_tar_samples(u)]


def write_tables(
    shards: list[str], out: Path, weights: dict[str, float] | None = None
) -> tuple[Path, list[str]]:
    """One caption-run-like table per shard: caption_synthetic (all but MISSING keys), 3 rewrites, a weight."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    pairs = slice_keys(shards)
    missing = [k for _, k in pairs[:MISSING]]
    for u in shards:
        name = shard_name(u)
        keys = [k for s, k in pairs if s == name and k not in missing]
        cols = {
            "key": keys,
            "shard": [name] * len(keys),
            "caption_synthetic": [f"synthetic {k}" for k in keys],
            "caption_rewrites": [[f"rewrite{j} {k}" for j in range(3)] for k in keys],
        }
        if weights is not None:
            cols["agree"] = [weights.get(k, 1.0) for k in keys]
        pq.write_table(pa.table(cols), str(out / f"{name.removesuffix('.tar')}.parquet"))
    return out, missing


def cfg_for(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        output=str(tmp_path / "run"), steps=3, batch_size=16, workers=0, threads=1, progress=False,
        tensorboard=False, lr=1e-2,
    )  # fmt: skip
    return from_dict(TrainConfig, {**base, **kw})


def record(into: list[dict]) -> TrainHooks:
    return TrainHooks(
        on_batch=lambda step, b, rank: into.append({"keys": b["keys"], "texts": b.get("texts")})
    )


# -- parsing and config errors ------------------------------------------------------------------


def test_unknown_mode_and_column_are_clear_errors(flickr_slice, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'synthetic'"):
        cfg_for(tmp_path, data=flickr_slice, text_source="syntetic", text_tables=["x"])
    with pytest.raises(ConfigError, match="needs text_tables"):
        cfg_for(tmp_path, data=flickr_slice, text_source="mix:0.5")
    with pytest.raises(ConfigError, match=r"P must be in \[0, 1\]"):
        TextSource.parse("mix:1.5")
    tables, _ = write_tables(flickr_slice, tmp_path / "side")
    with pytest.raises(ConfigError, match="did you mean 'caption_synthetic'"):
        SideTexts.load([str(tables)], TextSource("synthetic"), "caption_synthetc", "caption_rewrites", None)
    with pytest.raises(ConfigError, match="weight_column 'agreement' is in none"):
        SideTexts.load([str(tables)], TextSource("raw"), "caption_synthetic", "caption_rewrites", "agreement")
    with pytest.raises(ConfigError, match="does not exist"):
        SideTexts.load([str(tmp_path / "nope")], TextSource("synthetic"), "caption_synthetic", "x", None)
    # the error reaches the caller before any training
    cfg = cfg_for(tmp_path, data=flickr_slice, text_source="synthetic", text_tables=[str(tables)],
                  text_column="caption_synth")  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean"):
        fit(make_tiny(lock_image=1), flickr_slice, cfg)


# -- the choice, unit level ---------------------------------------------------------------------


def _side(rows: dict[str, dict]) -> SideTexts:
    return SideTexts(
        {k: {"": v} for k, v in rows.items()}, {"synthetic": "s", "rewrites": "r", "weight": None}, {}
    )


def test_mix_rate_is_p_and_deterministic():
    keys = [f"k{i}" for i in range(400)]
    side = _side({k: {"synthetic": f"syn {k}"} for k in keys})
    ch = TextChooser(TextSource("mix", p=0.3), side, k=1, seed=7)
    picks = [ch.choose([f"raw {k}"], [f"raw {k}"], k, "", e)[0] for e in range(5) for k in keys]
    rate = sum(p.startswith("syn") for p in picks) / len(picks)
    assert abs(rate - 0.3) < 0.03, rate
    again = [TextChooser(TextSource("mix", p=0.3), side, 1, 7).choose([f"raw {k}"], [], k, "", e)[0]
             for e in range(5) for k in keys]  # fmt: skip
    assert again == picks  # a fresh chooser (a resumed run) picks the same
    other_epoch = [ch.choose([f"raw {k}"], [], k, "", 9)[0] for k in keys]
    assert other_epoch != picks[:400]  # new draws each epoch
    zero = TextChooser(TextSource("mix", p=0.0), side, 1, 7)
    one = TextChooser(TextSource("mix", p=1.0), side, 1, 7)
    assert all(zero.choose(["r"], ["r"], k, "", 0) == ["r"] for k in keys)  # mix:0 == raw
    assert all(one.choose(["r"], ["r"], k, "", 0) == [f"syn {k}"] for k in keys)
    assert one.choose(["r"], ["r"], "not-in-table", "", 0) == ["r"]  # no synthetic: the raw caption
    # multi_positive K > 1: the source decides the first positive, the others stay raw
    k3 = TextChooser(TextSource("mix", p=1.0), side, k=3, seed=7)
    assert k3.choose(["r0", "r1", "r2"], ["r0", "r1", "r2"], "k1", "", 0) == ["syn k1", "r1", "r2"]


def test_rewrites_uniform_over_original_and_first_k():
    side = _side({"a": {"rewrites": ["r0", "r1", "r2", "r3"]}})
    ch = TextChooser(TextSource("rewrites", k=2), side, k=1, seed=0)
    counts = Counter(ch.choose(["orig"], ["orig"], "a", "", e)[0] for e in range(3000))
    assert set(counts) == {"orig", "r0", "r1"}  # only the first K rewrites
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in counts.values()), counts
    assert ch.choose(["orig"], ["orig"], "b", "", 0) == ["orig"]  # no rewrites: the original


def test_multi_positives_raw_synthetic_then_rest():
    syn = "A dog runs on the beach. The sky is very blue today."
    side = _side({"a": {"synthetic": syn, "rewrites": ["a dog at the sea"]}})
    two = TextChooser(TextSource("multi"), side, k=2, seed=0)
    assert two.choose(["raw one"], ["raw one", "raw two"], "a", "", 0) == ["raw one", syn]
    four = TextChooser(TextSource("multi"), side, k=4, seed=0)
    got = four.choose(["raw one"], ["raw one", "raw two"], "a", "", 0)
    assert got[:2] == ["raw one", syn] and len(set(got)) == 4
    assert set(got[2:]) <= {
        "a dog at the sea",
        "A dog runs on the beach.",
        "The sky is very blue today.",
        "raw two",
    }
    assert split_sentences(syn) == ["A dog runs on the beach.", "The sky is very blue today."]
    assert split_sentences("one short sentence only") == []
    pool = four.pool(["raw one", "raw two"], "a", "")
    assert len(pool) == len(set(pool)) == 6
    # no synthetic for a key: the raw caption and another text, never a crash
    assert TextChooser(TextSource("multi"), side, 2, 0).choose(["x"], ["x", "y"], "b", "", 0) == ["x", "y"]


# -- end to end: cached (locked towers) and streaming -------------------------------------------


def test_synthetic_cached_each_text_encoded_once_and_missing_counted(flickr_slice, tmp_path):
    tables, missing = write_tables(flickr_slice, tmp_path / "side")
    seen: list[dict] = []
    cfg = cfg_for(tmp_path, data=flickr_slice, text_source="synthetic", text_tables=[str(tables)], steps=5)
    model = fit(make_tiny(lock_image=1, lock_text=1), flickr_slice, cfg, hooks=record(seen))
    res = model.train_result
    assert res["mode"] == "cached"
    rep = res["text_source"]
    assert rep["samples"] == 95 and rep["missing"] == {"synthetic": MISSING}
    assert rep["missing_keys"]["synthetic"] == missing and rep["table_keys_unused"] == 1  # the corrupt one
    assert json.loads((tmp_path / "run" / "text_source.json").read_text()) == rep
    raw = {s["__key__"]: json.loads(s["json"])["captions"] for u in flickr_slice for s in iter_tar_samples(u)}
    for b in seen:
        for key, text in zip(b["keys"], b["texts"]):
            assert text in raw[key] if key in missing else text == f"synthetic {key}"
    # the side texts are in the feature cache once each, equal to a direct encoding
    from clipforge.train.cache import load_or_build_cache

    m = make_tiny(lock_image=1, lock_text=1).eval()
    files = list(Path(res["cache_dir"]).glob("texts-*.safetensors"))
    assert len(files) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        texts = json.loads(f.metadata()["texts"])
        pooled = f.get_tensor("pooled")
    assert len(texts) == len(set(texts)) == 95 - MISSING and pooled.shape[0] == len(texts)
    with torch.no_grad():
        want = m.text_features(m.tokenize(texts[:4]))["pooled"]
    torch.testing.assert_close(pooled[:4].float(), want, rtol=2e-3, atol=2e-3)
    data, _ = load_or_build_cache(m, flickr_slice, cfg.output + "/../.feature_cache", progress=False)
    assert len(data) == 95  # the shard cache itself is untouched


def test_mix_streaming_picks_raw_or_synthetic(flickr_slice, tmp_path):
    tables, missing = write_tables(flickr_slice, tmp_path / "side")
    seen: list[dict] = []
    cfg = cfg_for(tmp_path, data=flickr_slice, text_source="mix:0.5", text_tables=[str(tables)], steps=5,
                  shuffle_buffer=16, multi_positive=2)  # fmt: skip
    model = fit(make_tiny(), flickr_slice, cfg, hooks=record(seen))
    assert model.train_result["mode"] == "streaming"
    raw = {s["__key__"]: json.loads(s["json"])["captions"] for u in flickr_slice for s in iter_tar_samples(u)}
    kinds = Counter()
    for b in seen:
        assert len(b["texts"]) == 2 * len(b["keys"])
        for key, text, second in zip(b["keys"], b["texts"][::2], b["texts"][1::2]):
            assert second in raw[key]  # the second positive stays raw
            if text == f"synthetic {key}":
                kinds["syn"] += 1
            else:
                assert text in raw[key]
                kinds["raw"] += 1
    assert kinds["syn"] + kinds["raw"] == 80 and 25 <= kinds["syn"] <= 55, kinds
    assert model.train_result["text_source"]["missing"]["synthetic"] == MISSING


def test_multi_cached_positives_and_rewrites_streaming(flickr_slice, tmp_path):
    tables, missing = write_tables(flickr_slice, tmp_path / "side")
    seen: list[dict] = []
    cfg = cfg_for(tmp_path, data=flickr_slice, text_source="multi", text_tables=[str(tables)], steps=2)
    fit(make_tiny(lock_image=1), flickr_slice, cfg, hooks=record(seen))
    raw = {s["__key__"]: json.loads(s["json"])["captions"] for u in flickr_slice for s in iter_tar_samples(u)}
    for b in seen:
        assert len(b["texts"]) == 2 * len(b["keys"])
        for j, key in enumerate(b["keys"]):
            first, second = b["texts"][2 * j : 2 * j + 2]
            assert first in raw[key]
            assert second == f"synthetic {key}" if key not in missing else second in raw[key]
    seen.clear()
    cfg = cfg_for(
        tmp_path / "rw", data=flickr_slice, text_source="rewrites:2", text_tables=[str(tables)], steps=4
    )
    fit(make_tiny(), flickr_slice, cfg, hooks=record(seen))
    kinds = Counter()
    for b in seen:
        for key, text in zip(b["keys"], b["texts"]):
            kinds["orig" if text in raw[key] else text.split()[0]] += 1
            assert text in raw[key] or text in (f"rewrite0 {key}", f"rewrite1 {key}")
    assert set(kinds) == {"orig", "rewrite0", "rewrite1"}, kinds


# -- per-pair weights ---------------------------------------------------------------------------


def test_zero_weight_removes_a_pairs_loss_terms():
    from clipforge.train.loss import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    for loss in (ClipLoss(), SigLipLoss()):
        b = bias if isinstance(loss, SigLipLoss) else None
        plain = loss(img, txt, scale, b)
        torch.testing.assert_close(loss(img, txt, scale, b, weights=torch.ones(4)), plain)  # all ones
        zero = loss(img, txt, scale, b, weights=torch.zeros(4))
        gi, gt = torch.autograd.grad(zero, [img, txt], allow_unused=True)
        assert float(zero.detach()) == 0.0 and (gi is None or not gi.any()) and (gt is None or not gt.any())
    # with pair 0 weighted 0, its positive similarity no longer matters to the loss (CLIP rows of pair 0 gone)
    loss = ClipLoss()
    w = torch.tensor([0.0, 1.0, 1.0, 1.0])
    logits = scale * img @ txt.T
    rows_i = -torch.log_softmax(logits, 1).diagonal()
    rows_t = -torch.log_softmax(logits.T, 1).diagonal()
    want = ((rows_i * w).mean() + (rows_t * w).mean()) / 2
    torch.testing.assert_close(loss(img, txt, scale, None, weights=w), want)


@pytest.mark.parametrize("locked", [True, False])
def test_weights_reach_the_loss_in_training(locked, flickr_slice, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables, _ = write_tables(flickr_slice, tmp_path / "side")
    keys = [k for _, k in slice_keys(flickr_slice)]
    pq.write_table(pa.table({"key": keys, "agree": [0.0] * len(keys)}), str(tmp_path / "w.parquet"))
    cfg = cfg_for(tmp_path, data=flickr_slice, text_source="mix:0.5", text_tables=[str(tables), str(tmp_path / "w.parquet")],
                  weight_column="agree", steps=2, accum=2)  # fmt: skip
    model = make_tiny(lock_image=1, lock_text=1) if locked else make_tiny()
    res = fit(model, flickr_slice, cfg).train_result
    assert res["final_loss"] == 0.0  # every pair weighted 0 (the second table's column)
    assert res["text_source"]["with"]["weight"] == res["text_source"]["samples"]
    assert res["text_source"]["missing"]["synthetic"] == MISSING  # the first table's column, same keys


# -- exact resume: the same captions after a kill -9 --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,extra",
    [
        ("streaming", ["--workers", "2", "--shuffle-buffer", "16", "--text-source", "mix:0.5"]),
        ("cached", ["--workers", "1", "--model-opt", "lock_image=1", "--model-opt", "lock_text=1",
                    "--text-source", "multi", "--multi-positive", "3"]),
    ],
)  # fmt: skip
def test_kill9_resume_same_captions(mode, extra, flickr_slice, tmp_path, sub_env):
    import signal
    import subprocess
    import sys

    script = Path(__file__).resolve().parent / "train_with_hooks.py"
    tables, _ = write_tables(flickr_slice, tmp_path / "side")

    def train(out: Path, kill_at: int = 0, resume: bool = False):
        cmd = [sys.executable, str(script), "--keys-log", str(out / "keys.jsonl"), "--kill-at", str(kill_at), "--",
               "--model", "py:tiny_model:make_tiny", "--data", *flickr_slice, "--output", str(out), "--steps", "14",
               "--batch-size", "8", "--save-every", "5", "--lr", "1e-2", "--threads", "1", "--no-progress", "--json",
               "--text-tables", str(tables), *extra, *(["--resume"] if resume else [])]  # fmt: skip
        return subprocess.run(cmd, env=sub_env, capture_output=True, text=True, timeout=240)

    def by_step(out: Path) -> dict[int, tuple]:
        rows = [json.loads(x) for x in (out / "keys.jsonl.rank0").read_text().splitlines()]
        return {r["step"]: (r["keys"], r["texts"]) for r in rows}  # a resumed step replaces the killed one

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = train(ref)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["mode"] == mode
    assert train(cut, kill_at=8).returncode == -signal.SIGKILL
    resumed = train(cut, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want, got = by_step(ref), by_step(cut)
    assert sorted(want) == list(range(1, 15)) and got == want
    caps = [c for s in want.values() for c in s[1]]
    assert any(c.startswith("synthetic ") for c in caps) and any(not c.startswith("synthetic ") for c in caps)
    rows = [json.loads(x)["loss"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert rows == pytest.approx(ref_rows, rel=1e-5)


def test_cli_flags_and_yaml(tmp_path):
    import argparse

    from clipforge.train.cli import config_from_args, register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    args = ap.parse_args(["train", "--data", "a.tar", "--steps", "1", "--text-source", "mix:0.5",
                          "--text-tables", "t1", "t2", "--weight-column", "agree", "--no-text-splits"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.text_source, cfg.text_tables, cfg.weight_column, cfg.text_splits) == (
        "mix:0.5",
        ["t1", "t2"],
        "agree",
        False,
    )
    y = tmp_path / "c.yaml"
    y.write_text("data: [a.tar]\nsteps: 1\ntext_source: rewrites:4\ntext_tables: side/\n")
    cfg = config_from_args(ap.parse_args(["train", "--config", str(y)]))
    assert (cfg.text_source, cfg.text_tables) == ("rewrites:4", ["side/"])
    with pytest.raises(ConfigError, match="did you mean 'text_source'"):
        y.write_text("data: [a.tar]\nsteps: 1\ntext_sourc: multi\n")
        config_from_args(ap.parse_args(["train", "--config", str(y)]))


def test_resume_checks_the_text_source(tmp_path):
    import yaml

    from clipforge.train.config import TEXT_FIELDS, check_resume_config

    cfg = from_dict(TrainConfig, {"data": ["a.tar"], "steps": 1})
    path = tmp_path / "config.yaml"
    old = {k: v for k, v in cfg.to_dict().items() if k not in TEXT_FIELDS}  # a run from before the fields
    path.write_text(yaml.safe_dump(old))
    check_resume_config(path, cfg)
    mixed = from_dict(
        TrainConfig, {"data": ["a.tar"], "steps": 1, "text_source": "mix:0.5", "text_tables": ["t"]}
    )
    with pytest.raises(ConfigError, match="text_source"):
        check_resume_config(path, mixed)
    mixed.save(path)
    with pytest.raises(ConfigError, match="text_source"):
        check_resume_config(path, from_dict(TrainConfig, {**mixed.to_dict(), "text_source": "mix:0.4"}))


def test_tables_from_a_caption_run_dir_and_keys_in_several_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.train.textsource import table_files

    run = tmp_path / "caprun"
    (run / "captions").mkdir(parents=True)
    for shard, text in (("a.tar", "from a"), ("b.tar", "from b")):  # the same key in two shards
        pq.write_table(pa.table({"key": ["k0", f"only-{shard}"], "shard": [shard, shard],
                                 "caption_synthetic": [text, "x"]}),
                       str(run / "captions" / f"{shard}.parquet"))  # fmt: skip
        (run / "captions" / f"{shard}.bad.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    assert [p.name for p in table_files([str(run)])] == ["a.tar.parquet", "b.tar.parquet"]
    pq.write_table(pa.table({"key": ["k0", "only-a.tar"], "w": [0.5, float("nan")],
                             "caption_synthetic": ["  ", None]}), str(tmp_path / "w.parquet"))  # fmt: skip
    side = SideTexts.load([str(run), str(tmp_path / "w.parquet")], TextSource("synthetic"), "caption_synthetic",
                          "caption_rewrites", "w")  # fmt: skip
    assert side.get("k0", "a.tar") == {"synthetic": "from a", "weight": 0.5}
    assert side.get("k0", "b.tar") == {"synthetic": "from b", "weight": 0.5}
    assert side.get("only-a.tar", "zzz") == {"synthetic": "x"}  # NaN weight refused, blank caption = none
    assert side.bad == {"bad_weight": ["only-a.tar"], "bad_synthetic": ["k0"]}
    rep = side.coverage([("a.tar", "k0"), ("c.tar", "new")], TextSource("synthetic"))
    assert rep["missing"] == {"synthetic": 1, "weight": 1} and rep["missing_keys"]["synthetic"] == ["new"]
