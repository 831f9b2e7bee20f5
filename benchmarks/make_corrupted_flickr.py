"""Corrupt flickr8k train shards on purpose, with a ground truth of every injected fault.

Faults (the proof-on-real-data recipe of issue 5): captions shuffled among ``--shuffle`` of the pairs
(every shuffled pair gets another image's captions), exact duplicate images (same bytes, new key),
near duplicates (rescaled + slightly cropped + re-encoded JPEG, new key) and blank images (solid color
+ faint noise, with a random caption). Writes ``OUT/corrupt-%06d.tar`` (+ side tables) and
``OUT/faults.json``.

    python benchmarks/make_corrupted_flickr.py --out /tmp/flickr-corrupt --limit 1000
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.reader import iter_tar_samples
from clipforge.data.shards import expand_shards
from clipforge.data.writer import ShardWriter
from clipforge.utils import emit_json, write_json

DEFAULT = str(Path(__file__).resolve().parents[2] / "shared/data/flickr8k/train-{000000..000005}.tar")


def near_copy(data: bytes, rng: random.Random) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    c = rng.uniform(0.02, 0.06)
    img = img.crop((int(w * c), int(h * c), int(w * (1 - c)), int(h * (1 - c))))
    s = rng.choice([160, 192, 256])
    img = img.resize((s, s), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.choice([60, 70, 80]))
    return buf.getvalue()


def blank_image(rng: random.Random) -> bytes:
    color = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 1.5, (224, 224, 3))
    arr = np.clip(color + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[DEFAULT], help="clean shards (flickr8k train)")
    ap.add_argument("--out", required=True, help="output dir for corrupted shards + faults.json")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N clean samples")
    ap.add_argument(
        "--shuffle", type=float, default=0.30, help="fraction of pairs whose captions are shuffled"
    )
    ap.add_argument("--exact", type=float, default=0.10, help="exact duplicates added, as a fraction of N")
    ap.add_argument("--near", type=float, default=0.10, help="near duplicates added, as a fraction of N")
    ap.add_argument("--blank", type=float, default=0.05, help="blank images added, as a fraction of N")
    ap.add_argument("--maxcount", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    samples = []
    for url in expand_shards(a.data):
        for s in iter_tar_samples(url):
            samples.append(s)
            if a.limit and len(samples) >= a.limit:
                break
        if a.limit and len(samples) >= a.limit:
            break
    n = len(samples)
    idx = list(range(n))
    shuf = sorted(rng.sample(idx, int(round(a.shuffle * n))))
    perm = shuf[1:] + shuf[:1]  # a cyclic shift over a random subset: nobody keeps its own caption
    out = [dict(s) for s in samples]
    for i, j in zip(shuf, perm):
        # every caption field gets the other image's captions: KEY.txt AND KEY.json "captions" (the
        # trainer uses all five JSON captions); the image's own metadata (image_id, split) stays
        out[i]["txt"] = samples[j].get("txt")
        if samples[i].get("json") is not None:
            meta = json.loads(samples[i]["json"].decode("utf-8"))
            other = json.loads(samples[j]["json"].decode("utf-8")) if samples[j].get("json") else {}
            meta["captions"] = other.get("captions", [])
            out[i]["json"] = json.dumps(meta).encode("utf-8")
    shuffled_idx = set(shuf)
    faults = {
        "clean": n,
        "shuffled": [samples[i]["__key__"] for i in shuf],
        "exact_dup": {},
        "near_dup": {},
        "blank": [],
        "shuffled_copies": [],  # exact/near copies of a shuffled pair: they carry the wrong captions too
    }
    for kind, frac in (("exact_dup", a.exact), ("near_dup", a.near)):
        for j, i in enumerate(rng.sample(idx, int(round(frac * n)))):
            s = dict(out[i])
            key = f"{samples[i]['__key__']}_{kind}{j}"
            s["__key__"] = key
            if kind == "near_dup":
                s["jpg"] = near_copy(s["jpg"], rng)
            out.append(s)
            faults[kind][key] = samples[i]["__key__"]
            if i in shuffled_idx:
                faults["shuffled_copies"].append(key)
    for j in range(int(round(a.blank * n))):
        donor = out[rng.randrange(n)]
        key = f"blank_{j:05d}"
        out.append(
            {"__key__": key, "jpg": blank_image(rng), "txt": donor.get("txt"), "json": donor.get("json")}
        )
        faults["blank"].append(key)
    rng.shuffle(out)  # duplicates must not sit next to their originals
    with ShardWriter(output_dir=a.out, prefix="corrupt", maxcount=a.maxcount) as w:
        for s in out:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    write_json(Path(a.out) / "faults.json", faults)
    summary = {
        "out": a.out,
        "samples": len(out),
        "clean": n,
        "shards": len(w.shards),
        **{k: len(v) for k, v in faults.items() if k != "clean"},
    }
    if a.json:
        emit_json(summary)
    else:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
