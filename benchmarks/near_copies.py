"""Near-copy detection on flickr8k: pHash alone, the copy descriptor alone, and both (issue 13).

    python benchmarks/near_copies.py --json            # val + test, ~5k EfficientNet-Lite0 forwards on CPU

1. Calibrate: ``curate run --stages image,copy,dedup`` on the *clean* val split; the dedup stage picks
   the descriptor threshold from synthetic copies of a share of val images (no labels).
2. Plant: ``--sources`` val images (fixed seed) each get one near copy of every kind (resize, crop <= 10%,
   brightness/contrast, JPEG quality, small overlay text), written with the originals into one shard.
3. Detect: ``curate run`` on the planted shard with the val threshold fixed; pairs from pHash (radius
   ``dedup.phash_radius``), from the descriptor, and their union (``near_rule=or``) / intersection.
4. The same on the held-out test split, with the threshold calibrated on val only.

Recall (per kind and overall): share of planted copies whose (copy, source) pair is flagged. Precision:
share of flagged pairs that join a copy to its source or to a sibling copy (flagged pairs between two
unplanted flickr8k images count as false, even where they are real near duplicates of each other).
Caveat: the planted copies come from the same edit families as the calibration copies (different seeds).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from clipforge.curate.config import CurateConfig, DedupConfig
from clipforge.curate.copydetect import KINDS, center_normalize, key_rng, synthetic_copy
from clipforge.curate.dedup import copy_pairs, phash_pairs
from clipforge.curate.engine import run_curation
from clipforge.utils import emit_json, format_table

FLICKR = Path("/work/shared/data/flickr8k")
MODEL = "towers:efficientnet-lite0+minilm-l6"


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                key, ext = m.name.rsplit(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return list(out.items())


def plant(src: Path, dst: Path, n_sources: int, seed: int, overwrite: bool) -> dict[str, tuple[str, str]]:
    """Originals + one copy of every kind for ``n_sources`` of them; returns copy key -> (source, kind).

    An existing ``dst`` is kept (its truth file beside it): a rerun resumes the scored planted set.
    """
    truth_file = dst.with_suffix(".truth.json")
    if dst.exists() and truth_file.exists() and not overwrite:
        return {k: tuple(v) for k, v in json.loads(truth_file.read_text()).items()}
    samples = read_tar(src)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(samples), n_sources, replace=False).tolist())
    truth: dict[str, tuple[str, str]] = {}
    members = list(samples)
    for i in chosen:
        key, files = samples[i]
        img = Image.open(io.BytesIO(files["jpg"])).convert("RGB")
        for kind in KINDS:
            cp = synthetic_copy(img, kind, key_rng(f"{key}:{kind}", seed))
            buf = io.BytesIO()
            cp.save(buf, "JPEG", quality=95)
            ck = f"{key}_copy_{kind}"
            members.append((ck, {"jpg": buf.getvalue(), "txt": files.get("txt", b"")}))
            truth[ck] = (key, kind)
    with tarfile.open(dst, "w") as tf:
        for key, files in members:
            for ext, data in files.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    truth_file.write_text(json.dumps(truth))
    return truth


def curate(data: Path, out: Path, dedup: dict, model: str, overwrite: bool) -> tuple[dict, Path]:
    """``curate run`` (resumed when ``out`` holds the same config: only the global dedup stage reruns)."""
    cfg = CurateConfig.from_dict({"stages": ["image", "copy", "dedup"], "model": model, "dedup": dedup})
    s = run_curation([str(data)], out, cfg, progress=False, overwrite=overwrite)
    return s, out


def evaluate(out: Path, truth: dict[str, tuple[str, str]], threshold: float, cfg: DedupConfig) -> dict:
    table = pq.read_table(out / "scores.parquet", columns=["key", "phash"])
    keys = table.column("key").to_pylist()
    desc = np.concatenate([np.load(p) for p in sorted((out / "shards").glob("*.copy.npy"))])
    unit, _ = center_normalize(desc)
    group = [truth[k][0] if k in truth else k for k in keys]
    row = {k: i for i, k in enumerate(keys)}
    ph = phash_pairs(table.column("phash").to_pylist(), cfg.phash_radius, cfg.phash_k)
    de = copy_pairs(unit, threshold, cfg)[:2]
    as_set = lambda p: {(min(a, b), max(a, b)) for a, b in zip(p[0].tolist(), p[1].tolist())}  # noqa: E731
    methods = {"phash": as_set(ph), "descriptor": as_set(de)}
    methods["or"] = methods["phash"] | methods["descriptor"]
    methods["and"] = methods["phash"] & methods["descriptor"]
    res = {}
    for name, pairs in methods.items():
        true_pairs = [p for p in pairs if group[p[0]] == group[p[1]]]
        hit = {}
        for ck, (sk, kind) in truth.items():
            a, b = row[ck], row[sk]
            hit.setdefault(kind, []).append((min(a, b), max(a, b)) in pairs)
        res[name] = {
            "recall": round(float(np.mean([h for v in hit.values() for h in v])), 4),
            "precision": round(len(true_pairs) / max(1, len(pairs)), 4),
            "flagged_pairs": len(pairs),
            "false_pairs": len(pairs) - len(true_pairs),
            "recall_by_kind": {k: round(float(np.mean(v)), 4) for k, v in hit.items()},
        }
        # per-kind precision: flagged pairs touching a copy of that kind
        for kind in KINDS:
            touch = [p for p in pairs if any(keys[x] in truth and truth[keys[x]][1] == kind for x in p)]
            ok = sum(group[a] == group[b] for a, b in touch)
            res[name].setdefault("precision_by_kind", {})[kind] = round(ok / max(1, len(touch)), 4)
    pos = np.array([(unit[row[c]] * unit[row[s]]).sum() for c, (s, _) in truth.items()])
    res["descriptor_copy_cos_p5"] = round(float(np.percentile(pos, 5)), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(FLICKR))
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", default="runs/near_copies")
    ap.add_argument("--sources", type=int, default=200, help="images given one copy of every kind")
    ap.add_argument(
        "--calib-rate", type=float, default=0.3, help="share of val images given a synthetic copy"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--overwrite", action="store_true", help="rescore instead of resuming --work")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work, data = Path(a.work), Path(a.data_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calib = {"copy_calib_rate": a.calib_rate, "seed": a.seed}
    s, _ = curate(data / "val-000000.tar", work / "calib_val", calib, a.model, a.overwrite)
    st = s["global"]["dedup"]
    threshold = st["copy_threshold"]
    cfg = DedupConfig()
    report = {
        "model": a.model,
        "calibration": {"split": "val (clean)", "threshold": threshold, **st.get("copy_calibration", {})},
        "phash_radius": cfg.phash_radius,
        "sources": a.sources,
        "kinds": list(KINDS),
    }
    for i, split in enumerate(a.splits):
        planted = work / f"{split}_planted.tar"
        truth = plant(data / f"{split}-000000.tar", planted, a.sources, a.seed + 1000 + i, a.overwrite)
        # descriptors + pHash only (no synthetic copies); pairs are recomputed at the val threshold below
        s, out = curate(planted, work / f"run_{split}", {"copy_calib_rate": 0.0}, a.model, a.overwrite)
        report[split] = {"copies": len(truth), "rows": s["rows"], **evaluate(out, truth, threshold, cfg)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    if a.json:
        emit_json(report)
        return
    rows = []
    for split in a.splits:
        for m in ("phash", "descriptor", "or", "and"):
            r = report[split][m]
            for k in KINDS:
                rows.append((split, m, k, r["recall_by_kind"][k], r["precision_by_kind"][k]))
            rows.append((split, m, "ALL", r["recall"], r["precision"]))
    print(f"descriptor threshold (calibrated on clean val): {threshold:.4f}")
    print(format_table(rows, ["split", "method", "kind", "recall", "precision"]))


if __name__ == "__main__":
    main()
