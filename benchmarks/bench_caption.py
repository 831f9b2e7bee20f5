"""Caption-stage benchmark on flickr8k: a paired captioner trained on a CPU budget, scored on the test split.

1. ``caption train --mode paired`` (optionally on a decoder-training CPU budget) on flickr8k train (6,000 images x 5 captions) with frozen
   multiscale EfficientNet-Lite0 features (the locked-tower feature cache), scored on flickr8k test
   every ``--eval-every`` steps (greedy, BLEU-4 / CIDEr-D): the curve of BLEU-4 vs decoder-training
   CPU minutes (OUTPUT/bleu4_vs_cpu.png).
2. ``caption eval`` on flickr8k test (1,000 images x 5 references): greedy and beam-3, BLEU-1..4,
   METEOR, ROUGE-L, CIDEr-D (PTB tokenizer), caption statistics, and the built-in baselines
   (constant caption, nearest training image, kNN consensus k=40).
3. Decoding throughput: greedy and beam-3 captions/s, batched (64) vs one by one.
4. A caption grid (OUTPUT/caption_grid.png): test images with the generated and a reference caption.

    python benchmarks/bench_caption.py [--epochs 6 | --cpu-budget 12 --epochs 20] [--threads 1]
        [--output runs/bench_caption] [--json]

CPU time is ``time.process_time()`` of the training process (all its threads); note what else was
running on the machine next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from clipforge.caption.captioner import Captioner
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.evaluate import evaluate_captioning
from clipforge.caption.features import conditions_of_kind, training_set
from clipforge.caption.train import Prepared, train_captioner
from clipforge.models import load_model
from clipforge.utils import emit_json, format_table, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def throughput(cap: Captioner, cond: torch.Tensor, opts: DecodeOptions) -> dict[str, float]:
    """Captions/s batched (opts.batch_size) and one by one, on the same conditions."""
    out = {}
    cap.caption(cond[:4], opts)  # warm-up
    for name, bs in (("batched", opts.batch_size), ("one_by_one", 1)):
        o = DecodeOptions(**{**opts.__dict__, "batch_size": bs})
        n = cond.shape[0] if bs > 1 else min(cond.shape[0], 64)
        t = time.perf_counter()
        cap.caption(cond[:n], o)
        out[name] = n / (time.perf_counter() - t)
    return out


def test_conditions(encoder, test: str, kind: str, workers: int, path: str | None, spec: str):
    """The test split's condition vectors, cached in ``path`` (safetensors; keys and references in its
    metadata) so that a rerun on a loaded machine encodes nothing; recomputed when kind/model differ."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipforge.caption.features import Conditions

    want = {"kind": kind, "model": spec, "shards": test}
    if path and Path(path).is_file():
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in want.items()):
                keys, caps = json.loads(meta["keys"]), json.loads(meta["captions"])
                cond = f.get_tensor("cond")  # spatial tokens stay float16
                return Conditions(keys, cond if kind == "spatial" else cond.float(), caps)
    c = conditions_of_kind(encoder, test, kind, workers=workers)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta = {**want, "keys": json.dumps(c.keys), "captions": json.dumps(c.captions)}
        save_file({"cond": c.cond.contiguous()}, path, metadata=meta)
    return c


def curve_png(eval_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in eval_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["train_cpu_minutes"] for r in rows], [r["bleu4"] for r in rows], marker="o")
    ax.set_xlabel("decoder-training CPU minutes")
    ax.set_ylabel("flickr8k test BLEU-4 (greedy)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def caption_grid(test_shard: str, samples: list[dict], png: Path, n: int = 8) -> None:
    import io
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from clipforge.data.reader import iter_tar_samples

    want = {s["key"]: s for s in samples[:n]}
    images = {}
    for s in iter_tar_samples(test_shard):
        if s["__key__"] in want:
            images[s["__key__"]] = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        if len(images) == len(want):
            break
    fig, axes = plt.subplots(2, (len(want) + 1) // 2, figsize=(3.2 * ((len(want) + 1) // 2), 9))
    for ax, (k, s) in zip(axes.flat, want.items()):
        ax.imshow(images[k])
        ax.axis("off")
        gen = "\n".join(textwrap.wrap("gen: " + s["caption"], 34))
        ref = "\n".join(textwrap.wrap("ref: " + s["references"][0], 34))
        ax.set_title(f"{gen}\n{ref}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA / "flickr8k"))
    p.add_argument("--train", default=None, help="training shards (default DATA/train-{000000..000005}.tar)")
    p.add_argument("--test", default=None, help="test shard (default DATA/test-000000.tar)")
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument(
        "--model-opt", action="append", default=None, help="KEY=VALUE (default image_head=multiscale)"
    )
    p.add_argument("--decoder", default="4,256,4", help="layers,width,heads")
    p.add_argument("--prefix-len", type=int, default=4)
    p.add_argument("--cross-grid", type=int, default=0,
                   help="spatial: pool the token map to GRIDxGRID before cross-attending (0: all 7x7)")  # fmt: skip
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mode", default="paired", choices=("paired", "text-only"))
    p.add_argument("--condition", default="auto", choices=("auto", "features", "embedding", "spatial"),
                   help="auto: features of the locked tower (paired), embedding (text-only); spatial: "
                   "cross-attention to its 7x7 tokens (no baseline rows: they read vectors)")  # fmt: skip
    p.add_argument(
        "--noise-std", type=float, default=0.05, help="text-only: CapDec sigma (caption train's default)"
    )
    p.add_argument("--cross-caption", action=argparse.BooleanOptionalAction, default=True,
                   help="text-only: CLOSE cross-caption targets")  # fmt: skip
    p.add_argument("--decap-temperature", type=float, default=0.0,
                   help="text-only: DeCap temperature stored with the captioner (0: off)")  # fmt: skip
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--tokenizer", default="word", choices=("word", "wordpiece"),
                   help="caption vocabulary (wordpiece: the text tower's; --min-count 0 keeps all pieces)")  # fmt: skip
    p.add_argument("--output", default="runs/bench_caption")
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument(
        "--cpu-budget",
        type=float,
        default=None,
        help="decoder-training CPU minutes (cosine over the budget; --epochs is then an upper bound)",
    )
    p.add_argument("--wall-budget", type=float, default=None,
                   help="decoder-training wall minutes (shared machine): the schedule follows whichever budget "
                   "is spent first")  # fmt: skip
    p.add_argument("--curve-images", type=int, default=500, help="test images scored at each curve point")
    p.add_argument("--eval-images", type=int, default=None, help="test images scored at the end (all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", help="decoder training: fp32 | bf16 | auto")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="warmup steps (short budgets: ~50)")
    p.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=False,
                   help="build the locked-tower feature cache (also ~30k MiniLM caption passes) instead of "
                   "encoding the images in memory")  # fmt: skip
    p.add_argument("--cache-dir", default=None,
                   help="feature cache root (default OUTPUT/feature_cache; the quickstart's cache is reused "
                   "when the frozen towers match)")  # fmt: skip
    p.add_argument("--test-cache", default=None,
                   help="safetensors file caching the test conditions (written on first use)")  # fmt: skip
    p.add_argument("--val", default=None, help="also score this split at the end (e.g. DATA/val-000000.tar)")
    p.add_argument("--val-cache", default=None, help="safetensors file caching the --val conditions")
    p.add_argument("--beam-width", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rerank-beam", type=int, default=0,
                   help="also decode beam-W with consensus reranking (decode.rerank=consensus; 0: off)")  # fmt: skip
    p.add_argument("--rerank-k", type=int, default=20, help="consensus: training images that vote")
    p.add_argument("--rerank-weight", type=float, default=32.0, help="consensus: weight vs the decoder score")
    p.add_argument("--no-baselines", action="store_true", help="skip the baseline rows")
    p.add_argument("--no-throughput", action="store_true", help="skip the decoding-throughput check")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="reuse OUTPUT/train")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from clipforge.runtime import setup_process

    setup_process(a.threads)
    out = Path(a.output)
    from clipforge.config import parse_kv

    train = a.train or f"{a.data}/train-{{000000..000005}}.tar"
    test = a.test or f"{a.data}/test-000000.tar"
    model_opts = (
        parse_kv([o for o in a.model_opt if o]) if a.model_opt is not None else {"image_head": "multiscale"}
    )
    layers, width, heads = (int(x) for x in a.decoder.split(","))
    cache_dir = a.cache_dir or str(out / "feature_cache")
    cfg = {
        "data": [train], "output": str(out / "train"), "mode": a.mode, "noise_std": a.noise_std,
        "cross_caption": a.cross_caption, "decap_temperature": a.decap_temperature,
        "model": a.model, "model_opts": model_opts,
        "decoder": {"prefix_len": a.prefix_len, "layers": layers, "width": width, "heads": heads,
                    "dropout": a.dropout, "cross_grid": a.cross_grid},
        "min_count": a.min_count, "tokenizer": a.tokenizer, "epochs": a.epochs, "max_steps": a.max_steps,
        "cpu_budget_minutes": a.cpu_budget, "wall_budget_minutes": a.wall_budget, "precision": a.precision, "eval_limit": a.curve_images, "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup,
        "label_smoothing": a.label_smoothing, "weight_decay": a.weight_decay, "eval_data": [test], "eval_every": a.eval_every, "log_every": 50,
        "ckpt_every": 500, "threads": a.threads, "workers": a.workers, "feature_cache": a.feature_cache,
        "cache_dir": cache_dir,
    }  # fmt: skip
    # the encoder and every image encoded once, shared by training, evaluation and the throughput check
    t0, c0 = time.perf_counter(), time.process_time()
    encoder = load_model(a.model, allow_code=True, **model_opts)
    kind = "features" if encoder.image_locked and a.mode == "paired" else "embedding"
    kind = kind if a.condition == "auto" else a.condition
    cfg["condition"] = kind
    root = cache_dir if a.feature_cache else None
    if kind == "spatial":
        from clipforge.caption.spatial import spatial_training_set

        ts = spatial_training_set(encoder, train, cache_root=root, workers=a.workers)
    else:
        ts = training_set(
            encoder, train, kind, text=a.mode == "text-only", cache_root=root, workers=a.workers
        )
    prepared = Prepared(encoder, ts, test_conditions(encoder, test, kind, a.workers, a.test_cache, a.model))
    encode = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
              "images": len(prepared.train.cond) + len(prepared.eval)}  # fmt: skip
    if a.skip_train:
        summary = json.loads((out / "train" / "summary.json").read_text())
    else:
        summary = train_captioner(
            cfg, resume=a.resume, overwrite=a.overwrite, progress=not a.json, prepared=prepared
        )
    cap_dir = out / "train" / "captioner"
    curve_png(out / "train" / "eval.jsonl", out / "bleu4_vs_cpu.png")
    results = {
        "encode": encode,
        "train": summary,
        "curve": [json.loads(x) for x in (out / "train" / "eval.jsonl").read_text().splitlines()],
    }
    beam = DecodeOptions(method="beam", beam_width=a.beam_width, length_penalty=a.length_penalty)
    decodings = [("greedy", DecodeOptions(method="greedy")), ("beam3", beam)]
    if a.rerank_beam:
        rr = DecodeOptions(method="beam", beam_width=a.rerank_beam, length_penalty=a.length_penalty,
                           rerank="consensus", rerank_k=a.rerank_k, rerank_weight=a.rerank_weight)  # fmt: skip
        decodings.append((f"beam{a.rerank_beam}_consensus", rr))
    for name, opts in decodings:
        # baselines once (greedy row); spatial: none (they read vectors), novelty from the training captions
        base = name == "greedy" and not a.no_baselines and kind != "spatial"
        r = evaluate_captioning(cap_dir, test, scoring_model="none", decode=opts, baselines=base,
                                train_data=None if base or kind == "spatial" else [], workers=a.workers,
                                prepared=prepared, limit=a.eval_images)  # fmt: skip
        results[f"eval_{name}"] = r
        if name == "greedy":
            caption_grid(test, r["samples"], out / "caption_grid.png")
    if a.val:  # the split settings are chosen on (test stays held out)
        val = Prepared(encoder, ts, test_conditions(encoder, a.val, kind, a.workers, a.val_cache, a.model))
        for name, opts in decodings:
            results[f"val_{name}"] = evaluate_captioning(
                cap_dir, a.val, scoring_model="none", decode=opts, baselines=False,
                train_data=None, workers=a.workers, prepared=val,  # novelty: the training captions
            )  # fmt: skip
    if not a.no_throughput:
        cap = Captioner.load(cap_dir)
        cond = prepared.eval.cond[:256]
        results["throughput"] = {
            "greedy": throughput(cap, cond, DecodeOptions(method="greedy")),
            "beam3": throughput(cap, cond, beam),
            "threads": torch.get_num_threads(),
        }
    write_json(out / "results.json", results)
    if a.json:
        emit_json(results)
        return
    cols = ["bleu1", "bleu4", "meteor", "rouge_l", "cider_d", "distinct", "mean_length", "novel_share"]
    rows = []
    for name in [f"{split}_{d}" for split in ("eval", "val") for d, _ in decodings]:
        for r in results.get(name, {}).get("results", []):
            split = name.replace("eval_", "test ").replace("_", " ")
            rows.append([f"{r['task']} ({split})", *(r["metrics"].get(c, float("nan")) for c in cols)])
    print(format_table(rows, ["row", *cols]))
    print(
        f"encode: {encode['images']} images, {encode['cpu_s'] / 60:.1f} CPU min, {encode['wall_s'] / 60:.1f} wall min"
    )
    print(f"train: {summary['steps']} steps, {summary['train_cpu_s'] / 60:.1f} decoder-training CPU min, "
          f"{summary['wall_s'] / 60:.1f} wall min (setup incl. feature cache {summary['prepare_cpu_s'] / 60:.1f} CPU min)")  # fmt: skip
    for k, v in results.get("throughput", {}).items():
        print(f"throughput {k}: {v}")


if __name__ == "__main__":
    main()
