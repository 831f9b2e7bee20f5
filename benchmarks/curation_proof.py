"""Issue 5 proof on real data: train on clean, corrupted, and corrupted-then-curated flickr8k; compare.

Steps (each is a ``clipforge`` CLI call, so this script follows the commands users run):

1. ``make_corrupted_flickr.py``: shuffle 30% of captions, add exact/near duplicates and blank images.
2. ``clipforge curate run`` on the corrupted set (clip-score with ``--scorer``, text, image, dedup
   against the flickr8k test set), then ``clipforge curate filter`` with the recipe below.
3. ``clipforge train`` the quickstart recipe three times: (a) clean, (b) corrupted, (c) curated.
4. ``clipforge eval run`` on each: flickr8k retrieval + CIFAR-10 zero-shot; one table + JSON.

The scorer should be a model trained on *other* data (DataComp uses OpenAI CLIP); by default this
script uses model (a), which saw the clean pairs: an optimistic upper bound, said so in the output.
This takes hours of CPU for the full set; ``--limit`` and ``--epochs`` make a small run possible.

    python benchmarks/curation_proof.py --work /tmp/proof --limit 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLICKR = HERE.parents[1] / "shared" / "data" / "flickr8k"
RECIPE = [
    "image_valid and not is_blank",
    "not is_duplicate",
    "not is_eval_duplicate",
    "clip_score top 70%",
    "caption_words >= 3",
]


def sh(cmd: list[str]) -> dict:
    print("+ " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def train(data: list[str], out: Path, a: argparse.Namespace) -> str:
    res = sh(
        [
            "clipforge",
            "train",
            "--model",
            a.model,
            "--data",
            *data,
            "--output",
            str(out),
            "--epochs",
            str(a.epochs),
            "--batch-size",
            str(a.batch_size),
            "--json",
        ]
    )
    for k in ("model_dir", "final_model", "model"):
        if isinstance(res.get(k), str) and Path(res[k]).exists():
            return res[k]
    return str(out / "final") if (out / "final").exists() else str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="work dir (shards, scores, runs, results.json)")
    ap.add_argument("--limit", type=int, default=None, help="clean train samples to use (default all 6000)")
    ap.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6", help="quickstart model spec")
    ap.add_argument("--scorer", default=None, help="clip-score model (default: model trained on clean data)")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--where",
        action="append",
        default=None,
        help="curation recipe, repeatable (default: " + "; ".join(RECIPE).replace("%", "%%") + ")",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    w = Path(a.work)
    clean = [str(p) for p in sorted(FLICKR.glob("train-*.tar"))]
    corrupt = w / "corrupt"
    sys.path.insert(0, str(HERE))
    import make_corrupted_flickr

    if not (corrupt / "faults.json").exists():
        make_corrupted_flickr.main(
            ["--data", *clean, "--out", str(corrupt)] + (["--limit", str(a.limit)] if a.limit else [])
        )
    if a.limit:  # the clean baseline uses the same clean samples the corrupted set was made from
        if not (w / "clean" / "faults.json").exists():
            zero = ["--shuffle", "0", "--exact", "0", "--near", "0", "--blank", "0"]
            make_corrupted_flickr.main(
                ["--data", *clean, "--out", str(w / "clean"), "--limit", str(a.limit), *zero]
            )
        clean = [str(p) for p in sorted((w / "clean").glob("corrupt-*.tar"))]
    corrupt_shards = [str(p) for p in sorted(corrupt.glob("corrupt-*.tar"))]
    runs = {}
    runs["a_clean"] = train(clean, w / "runs" / "a_clean", a)
    runs["b_corrupted"] = train(corrupt_shards, w / "runs" / "b_corrupted", a)
    scorer = a.scorer or runs["a_clean"]
    sh(
        [
            "clipforge",
            "curate",
            "run",
            "--data",
            *corrupt_shards,
            "--output",
            str(w / "scores"),
            "--model",
            scorer,
            "--stages",
            "clip-score,text,image,dedup",
            "--eval-data",
            str(FLICKR / "test-000000.tar"),
            "--json",
        ]
    )
    sys.path.insert(0, str(HERE))
    from eval_corruption import evaluate_faults

    faults = evaluate_faults(str(w / "scores"), str(corrupt / "faults.json"))
    where = [x for e in (a.where or RECIPE) for x in ("--where", e)]
    sh(
        [
            "clipforge",
            "curate",
            "filter",
            "--scores",
            str(w / "scores"),
            *where,
            "--output",
            str(w / "curated"),
            "--json",
        ]
    )
    runs["c_curated"] = train(
        [str(p) for p in sorted((w / "curated").glob("*.tar"))], w / "runs" / "c_curated", a
    )
    results = {
        name: sh(["clipforge", "eval", "run", "--model", m, "--output", str(w / "eval" / name), "--json"])
        for name, m in runs.items()
    }
    out = {
        "runs": runs,
        "eval": results,
        "faults": faults,
        "scorer": scorer,
        "note": "scorer = model (a) trained on clean pairs (optimistic)" if not a.scorer else "",
    }
    (w / "proof.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
