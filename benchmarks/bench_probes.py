"""Blind-LM cost and accuracy of the generated compositionality probes, without any CLIP model.

    python benchmarks/bench_probes.py --llm smollm2 --stages 100,200,400 --budget-s 3000 \
        --candidates 6 --per-image 3 --output runs/bench-probes

Reads the flickr8k test captions (no image is decoded), generates the probes and lets the blind LM
choose the negatives (``compositionality.make_probes``, the code ``clipforge eval compositionality``
runs), at growing ``--stages`` of images per type. The LM's per-text scores are cached on disk by its
fingerprint, so each stage scores only the captions the previous one did not reach, and a rerun is
free; a stage that would start past ``--budget-s`` is not started. Per stage and probe type:
images with an item, items kept, the blind LM's accuracy on them with a bootstrap 95% interval, its
naive (unfiltered) accuracy, and the LM seconds / texts scored. The last stage's ``probes.jsonl``
goes to ``OUTPUT`` and is what ``clipforge eval compositionality --probes`` scores a model on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.config import from_dict
from clipforge.evaluate.compositionality import (
    _write_jsonl,
    bootstrap_ci,
    load_blind_lm,
    make_probes,
    read_caption_shards,
)
from clipforge.evaluate.config import CompositionalityConfig
from clipforge.utils import emit_json, format_table, write_json


def read_captions(shards: list[str]) -> dict[str, list[str]]:
    caps, report = read_caption_shards(shards)
    if report.total:
        print(f"caption shards: {report.summary()}", file=sys.stderr)
    return caps


def stage_rows(kept: list[dict[str, Any]], generated: Any, info: dict[str, Any], n_boot: int) -> dict:
    out = {}
    for t in generated:
        b = np.array(
            [it["lm_pos"] > it["lm_neg"] for it in kept if it["type"] == t and it.get("lm_pos") is not None]
        )
        lo, hi = bootstrap_ci(b, n_boot) if len(b) else (float("nan"), float("nan"))
        llm = info.get("llm_per_type", {}).get(t, {})
        out[t] = {"images": int(generated[t]), "kept": int(len(b)),
                  "blind_accuracy": float(b.mean()) if len(b) else None, "blind_ci95": [lo, hi],
                  "blind_unfiltered": info.get("unfiltered", {}).get(t), "llm_seconds": llm.get("seconds"),
                  "llm_texts_scored": llm.get("scored")}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", nargs="*", default=None, help="caption shards (default: flickr8k test)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--llm", default="smollm2")
    p.add_argument("--stages", default="100,200,300", help="images per probe type, growing")
    p.add_argument("--budget-s", type=float, default=3600.0, help="start no stage after this many seconds")
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--per-image", type=int, default=3)
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--selection", default="likeliest", choices=["likeliest", "closest"])
    p.add_argument("--no-frequency", action="store_true")
    p.add_argument("--types", nargs="*", default=None)
    p.add_argument("--llm-cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="runs/bench-probes")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from clipforge.data.shards import expand_shards
    from clipforge.evaluate.recipes import builtin

    caps = read_captions(expand_shards(a.captions or [builtin("flickr8k", a.data_root).shards]))
    t_start = time.perf_counter()
    stages, out_dir, lm, load_info = [], Path(a.output), None, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in [int(x) for x in a.stages.split(",")]:
        if time.perf_counter() - t_start > a.budget_s:
            print(f"budget reached: stage {m} not started", file=sys.stderr)
            break
        cfg = from_dict(CompositionalityConfig, {
            "llm": a.llm, "max_items": m, "candidates": a.candidates, "per_image": a.per_image,
            "blind_margin": a.margin, "selection": a.selection, "frequency": not a.no_frequency,
            "types": a.types, "llm_cache_dir": a.llm_cache_dir, "seed": a.seed, "progress": False,
        })  # fmt: skip
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        if lm is None:  # loaded once: each stage reuses it (and its score cache)
            lm = load_blind_lm(cfg, load_info)
        info.update(load_info)
        kept, generated, records = make_probes(caps, cfg, info, lm=lm)
        rows = stage_rows(kept, generated, info, cfg.bootstrap)
        stage = {"max_items": m, "seconds": time.perf_counter() - t0, "llm_seconds": info.get("llm_seconds"),
                 "llm_load_seconds": info.get("llm_load_seconds"), "llm_cache": info.get("llm_cache"),
                 "types": rows}  # fmt: skip
        stages.append(stage)
        digest = _write_jsonl(out_dir / "probes.jsonl", records)
        write_json(out_dir / "bench_probes.json", {"settings": vars(a), "llm_fingerprint": info.get("llm_fingerprint"),
                                                   "probes_sha256": digest, "stages": stages})  # fmt: skip
        print(f"stage {m}: {stage['seconds']:.0f} s (LM {stage['llm_seconds']:.0f} s)", file=sys.stderr)
    if a.json:
        emit_json({"stages": stages})
        return 0
    for st in stages:
        print(f"\nimages per type <= {st['max_items']}: {st['seconds']:.0f} s")
        print(format_table([[t, r["images"], r["kept"],
                             "-" if r["blind_accuracy"] is None
                             else f"{r['blind_accuracy']:.3f} [{r['blind_ci95'][0]:.3f}, {r['blind_ci95'][1]:.3f}]",
                             "-" if r["blind_unfiltered"] is None else f"{r['blind_unfiltered']:.3f}",
                             f"{r['llm_seconds'] or 0:.0f}", r["llm_texts_scored"]]
                            for t, r in st["types"].items()],
                           ["probe", "images", "kept", "blind acc [95% CI]", "unfiltered", "LM s", "texts"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
