"""Out-of-fold clip scores (issue 13): stable key folds, K scorers that never see their fold, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from curate_testutils import CAPTIONS, image_bytes, write_shard

from clipforge.curate.config import CurateConfig, FoldsConfig
from clipforge.curate.folds import fold_of, run_folds, score_fold, split_folds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # tiny_model (py: spec)
TINY = {"model": "py:tiny_model:make_tiny", "model_opts": {"lock_image": 1, "lock_text": 1}}


def shards(tmp: Path, n_shards: int = 2, per_shard: int = 16) -> list[str]:
    paths = []
    tmp.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        rows = [
            {
                "key": f"k{s}_{i:03d}",
                "jpg": image_bytes(s * 100 + i),
                "txt": CAPTIONS[(s + i) % len(CAPTIONS)],
            }
            for i in range(per_shard)
        ]
        if s == 0:
            rows[3]["jpg"] = b"not an image"  # counted bad while caching: no score, never a crash
        paths.append(str(write_shard(tmp / f"part-{s:06d}.tar", rows)))
    return paths


def test_fold_of_is_stable_and_balanced():
    keys = [f"img_{i}" for i in range(4000)]
    folds = [fold_of(k, 3) for k in keys]
    assert folds == [fold_of(k, 3) for k in keys]  # deterministic (no per-process hash seed)
    assert all(1200 < folds.count(i) < 1470 for i in range(3))
    assert [fold_of(k, 3, seed=1) for k in keys] != folds  # the salt reshuffles


def test_split_does_not_depend_on_the_shard_layout(tmp_path):
    a = shards(tmp_path / "a", n_shards=2, per_shard=16)
    merged = tmp_path / "b"
    merged.mkdir()
    from clipforge.data.reader import iter_tar_samples

    rows = []
    for u in a:
        for s in iter_tar_samples(u):
            rows.append({"key": s["__key__"], "jpg": s["jpg"], "txt": s["txt"].decode()})
    b = [str(write_shard(merged / "one.tar", rows[::-1]))]  # one shard, reversed order
    sa = split_folds(a, tmp_path / "fa", 2)
    sb = split_folds(b, tmp_path / "fb", 2)
    assert sa["rows"] == sb["rows"] and sum(sa["rows"]) == 32

    def keys(d, i):
        return sorted(
            s["__key__"]
            for u in sorted((d / "data").glob(f"fold{i}-*.tar"))
            for s in iter_tar_samples(str(u))
        )

    assert keys(tmp_path / "fa", 0) == keys(tmp_path / "fb", 0)
    assert split_folds(a, tmp_path / "fa", 2) == sa  # finished split: reused
    with pytest.raises(ValueError, match="other inputs"):
        split_folds(a, tmp_path / "fa", 3)


def test_oof_scores_come_from_the_scorer_that_never_saw_the_fold(tmp_path, monkeypatch):
    data = shards(tmp_path)
    cfg = FoldsConfig(k=2, epochs=1, batch_size=8, **TINY)
    res = run_folds(data, tmp_path / "folds", cfg, threads=1)
    oof = pq.read_table(tmp_path / "folds" / "oof.parquet").to_pylist()
    assert len(oof) == 31 == res["scored"]  # 32 samples, one undecodable
    assert all(r["fold"] == fold_of(r["key"], 2) for r in oof)
    for i in range(2):  # scorer i trained on the other fold's shards only
        trained = json.loads((tmp_path / "folds" / f"scorer{i}" / "result.json").read_text())
        import yaml

        seen = yaml.safe_load((tmp_path / "folds" / f"scorer{i}" / "config.yaml").read_text())["data"]
        assert seen and all(Path(u).name.startswith(f"fold{1 - i}-") for u in seen), (trained, seen)
    # the cache path scores like the curate clip-score stage on the same model (float16 cache tolerance)
    from clipforge.curate.engine import run_curation

    fold0 = [str(p) for p in sorted((tmp_path / "folds" / "data").glob("fold0-*.tar"))]
    from safetensors.torch import load_file
    from tiny_model import make_tiny

    m = make_tiny(lock_image=1, lock_text=1)
    m.load_state_dict(load_file(str(Path(res["scorers"][0]) / "model.safetensors")))
    m.eval()
    cur = CurateConfig(stages=["clip-score"], model=res["scorers"][0])
    run_curation(fold0, tmp_path / "stage", cur, model=m, progress=False)
    st = pq.read_table(tmp_path / "stage" / "scores.parquet").to_pylist()
    want = {r["key"]: r["clip_score"] for r in st if r["clip_score"] is not None}
    got = score_fold(res["scorers"][0], fold0, tmp_path / "folds" / "feature_cache", model=m)
    assert set(got) == set(want)
    assert max(abs(got[k] - want[k]) for k in want) < 0.02

    # resume: nothing is retrained or rescored
    import clipforge.curate.folds as folds_mod

    def boom(*a, **k):
        raise AssertionError("a finished fold step ran again")

    monkeypatch.setattr(folds_mod, "fit", boom, raising=False)
    monkeypatch.setattr(folds_mod, "score_fold", boom)
    again = run_folds(data, tmp_path / "folds", cfg, threads=1)
    assert again["scorers"] == res["scorers"] and again["scored"] == 31


def test_curate_run_folds_cli_writes_the_usual_table(tmp_path, capsys):
    from clipforge.cli import main

    data = shards(tmp_path)
    out = tmp_path / "cur"
    argv = ["curate", "run", "--data", *data, "--output", str(out), "--stages", "clip-score", "--folds", "2"]
    argv += [
        "--recipe",
        "quickstart",
        "--folds.epochs",
        "1",
        "--folds.batch-size",
        "8",
        "--folds.model",
        TINY["model"],
    ]
    argv += [
        "--folds.model-opts",
        "lock_image=1",
        "--folds.model-opts",
        "lock_text=1",
        "--threads",
        "1",
        "--json",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["folds"]["k"] == 2 and summary["folds"]["scored"] == 31
    t = pq.read_table(out / "scores.parquet")
    assert {"key", "clip_score", "fold"} <= set(t.column_names) and t.num_rows == 32
    assert sum(v is not None for v in t.column("clip_score").to_pylist()) == 31  # the bad image: null
    assert summary["folds"]["missing"] == 1
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["folds"]["k"] == 2
        and saved["folds"]["recipe"] == "quickstart"
        and "clip-score" in saved["stages"]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["folds"]["k"] == 2 and len(manifest["folds"]["scorers"]) == 2
    # the filter reads the out-of-fold column like any score
    assert (
        main(
            [
                "curate",
                "filter",
                "--scores",
                str(out),
                "--where",
                "clip_score > auto",
                "--output",
                str(tmp_path / "f"),
                "--no-reshard",
                "--json",
            ]
        )
        == 0
    )
    # rerun = resume (same settings): nothing retrained
    assert main(argv) == 0
    assert (
        main(["curate", "run", "--data", *data, "--output", str(out), "--folds", "1"]) == 2
    )  # K=1 is an error


def caption_shards(tmp: Path, n_shards: int = 2, per_shard: int = 12) -> list[str]:
    """Samples with 3 captions each in KEY.json (KEY.txt = the first), like flickr8k's five."""
    import io
    import tarfile

    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = tmp / f"caps-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"c{s}_{i:03d}"
                caps = [CAPTIONS[(s + i + j) % len(CAPTIONS)] for j in (0, 2, 3)]
                members = {"jpg": image_bytes(s * 100 + i), "txt": caps[0].encode(),
                           "json": json.dumps({"captions": caps}).encode()}  # fmt: skip
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(str(path))
    return paths


def test_all_captions_score_is_the_mean_over_the_samples_captions(tmp_path):
    from safetensors.torch import load_file
    from tiny_model import make_tiny

    from clipforge.caption.features import head_embeddings
    from clipforge.models.encode import embed_texts
    from clipforge.train.cache import load_or_build_cache

    data = caption_shards(tmp_path)
    cfg = FoldsConfig(k=2, epochs=1, batch_size=8, captions="all", **TINY)
    res = run_folds(data, tmp_path / "folds", cfg, threads=1)
    assert res["captions"] == "all" and (tmp_path / "folds" / "scores" / "fold0-all.parquet").is_file()
    oof = {r["key"]: r["clip_score"] for r in pq.read_table(tmp_path / "folds" / "oof.parquet").to_pylist()}
    assert len(oof) == 24
    differ = 0.0
    for i in range(2):  # by hand: scorer i's image head on the cached features, every caption's text path
        m = make_tiny(lock_image=1, lock_text=1)
        m.load_state_dict(load_file(str(Path(res["scorers"][i]) / "model.safetensors")))
        m.eval()
        fold = [str(p) for p in sorted((tmp_path / "folds" / "data").glob(f"fold{i}-*.tar"))]
        cache = tmp_path / "folds" / "feature_cache"
        d, _ = load_or_build_cache(m, fold, cache, workers=0, progress=False)
        img = head_embeddings(m, d.image, "image").numpy()
        for n, k in enumerate(d.keys):
            assert len(d.captions[n]) == 3
            want = float((embed_texts(m, d.captions[n]) @ img[n]).mean())
            assert oof[k] == pytest.approx(want, abs=0.02)
        first = score_fold(res["scorers"][i], fold, cache, model=m)  # the KEY.txt rule: another score
        differ = max(differ, max(abs(first[k] - oof[k]) for k in first))
    assert differ > 1e-3


def trained_keys(run_dir: Path) -> list[str]:
    """The sample keys of the shards a scorer's training run read (its saved config's data)."""
    import yaml

    from clipforge.data.reader import iter_tar_samples

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    return [s["__key__"] for u in data for s in iter_tar_samples(u)]


def test_round2_scorers_train_only_on_trusted_pairs_of_the_other_folds(tmp_path, monkeypatch):
    import numpy as np

    import clipforge.train
    from clipforge.curate.threshold import auto_threshold
    from clipforge.data.reader import iter_tar_samples

    data = shards(tmp_path, per_shard=24)
    cfg = FoldsConfig(k=2, epochs=1, batch_size=8, rounds=2, **TINY)
    res = run_folds(data, tmp_path / "folds", cfg, threads=1)
    r2 = tmp_path / "folds" / "round2"
    assert [r["round"] for r in res["rounds"]] == [1, 2] and res["scored"] == 47
    # the final table: round 2's scores as clip_score, round 1's alongside
    oof = {r["key"]: r for r in pq.read_table(tmp_path / "folds" / "oof.parquet").to_pylist()}
    for rdir, col in ((tmp_path / "folds", "clip_score_round1"), (r2, "clip_score")):
        for i in range(2):
            for row in pq.read_table(rdir / "scores" / f"fold{i}.parquet").to_pylist():
                assert oof[row["key"]][col] == row["clip_score"] and row["fold"] == i
    # the round-1 cut, recomputed here: the mixture per caption-length bucket on all round-1 scores
    caps = {s["__key__"]: s["txt"].decode() for u in data for s in iter_tar_samples(u)}
    keys = list(oof)
    r1 = np.array([oof[k]["clip_score_round1"] for k in keys])
    cut = dict(zip(keys, auto_threshold(r1, [caps[k] for k in keys])["cuts"]))
    trusted = {k for k in keys if oof[k]["clip_score_round1"] > cut[k]}
    assert 0 < len(trusted) < len(keys)  # some pairs are left out, or the check below proves nothing
    for i in range(2):
        seen = trained_keys(r2 / f"scorer{i}")
        others = {k for k in keys if fold_of(k, 2) != i}
        assert seen and all(fold_of(k, 2) != i for k in seen)  # never its own fold
        assert set(seen) == others & trusted  # every trusted pair of the other folds, no other
        assert res["rounds"][1]["trusted_per_scorer"][i] == len(seen)
    assert res["rounds"][1]["noise_rate"] > 0 and res["rounds"][1]["cuts"]

    # resume: a finished round 2 reruns nothing; a killed one trains only the scorer it lacks
    runs: list[str] = []
    real_fit = clipforge.train.fit

    def counting_fit(model, shards, config=None, **kw):
        runs.append(config.output)
        return real_fit(model, shards, config, **kw)

    monkeypatch.setattr(clipforge.train, "fit", counting_fit)
    again = run_folds(data, tmp_path / "folds", cfg, threads=1)
    assert runs == [] and again["scorers"] == res["scorers"] and again["rounds"][1] == res["rounds"][1]
    import shutil

    shutil.rmtree(r2 / "scorer1")
    (r2 / "scores" / "fold1.parquet").unlink()
    run_folds(data, tmp_path / "folds", cfg, threads=1)
    assert runs == [str(r2 / "scorer1")]


def test_folds_rounds_is_validated_and_reaches_the_table(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.config import ConfigError

    for bad in (0, 4):
        with pytest.raises(ConfigError, match="folds.rounds"):
            CurateConfig.from_dict({"folds": {"k": 2, "rounds": bad}})
        with pytest.raises(ConfigError, match="folds.rounds"):
            run_folds([], tmp_path / "never", FoldsConfig(k=2, rounds=bad))
    data = shards(tmp_path)
    out = tmp_path / "cur"
    argv = ["curate", "run", "--data", *data, "--output", str(out), "--stages", "clip-score", "--folds", "2"]
    argv += ["--folds.rounds", "2", "--folds.epochs", "1", "--folds.batch-size", "8"]
    argv += ["--folds.model", TINY["model"], "--folds.model-opts", "lock_image=1"]
    argv += ["--folds.model-opts", "lock_text=1", "--threads", "1", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["round"] for r in summary["folds"]["rounds"]] == [1, 2]
    assert "trusted_per_scorer" in summary["folds"]["rounds"][1]
    t = pq.read_table(out / "scores.parquet")
    assert {"clip_score", "clip_score_round1", "fold"} <= set(t.column_names) and t.num_rows == 32
    oof = pq.read_table(out / "folds" / "round2" / "oof.parquet")
    r2 = dict(zip(oof.column("key").to_pylist(), oof.column("clip_score").to_pylist()))
    final = dict(zip(t.column("key").to_pylist(), t.column("clip_score").to_pylist()))
    assert {k: s for k, s in final.items() if s is not None} == r2  # the bad image: null
    assert json.loads((out / "manifest.json").read_text())["folds"]["rounds"][1]["round"] == 2
    argv[argv.index("--folds.rounds") + 1] = "9"
    assert main(argv) == 2 and "folds.rounds must be in 1..3" in capsys.readouterr().out
