"""The evaluation API: a model + datasets -> every number, each image embedded once.

``evaluate(model, ["cifar10", "flickr8k"])`` embeds CIFAR-10 once for zero-shot *and* the probe and
flickr8k once for retrieval, then returns (and optionally saves) one result dict. The task functions
(:func:`run_zeroshot`, :func:`run_retrieval`, :func:`run_probe`) take an already embedded
:class:`ImageSet`, so a caller that has embeddings (e.g. quickstart) can reuse them.
Under torchrun every rank calls the same functions; only rank 0 writes files.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.evaluate import dist
from clipforge.evaluate.config import TASKS, EvalConfig, EvalRun, eval_config
from clipforge.evaluate.embed import ImageSet, embed_images, embed_texts
from clipforge.evaluate.probe import linear_probe
from clipforge.evaluate.recipes import DatasetSpec, builtin, probe_split
from clipforge.evaluate.results import shard_fingerprint
from clipforge.evaluate.retrieval import flatten_captions, recall_at_k
from clipforge.evaluate.zeroshot import (
    class_embeddings,
    load_classnames,
    load_descriptions,
    load_templates,
    plot_confusion,
    zeroshot_metrics,
)
from clipforge.models.encode import fingerprint as model_fingerprint

log = logging.getLogger(__name__)


def run_zeroshot(
    model: Any,
    images: ImageSet,
    classnames: list[str],
    templates: str = "imagenet80",
    descriptions: str | Path | None = None,
    *,
    confusion_png: str | Path | None = None,
    cache: bool | str | Path = True,
    fingerprint: str | None = None,
    text_batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = True,
    baseline: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of embedded, labelled images -> result entry.

    With ``descriptions`` and ``baseline``, the templates alone are scored too (``templates_only``), on
    the same image embeddings: the gain of the descriptions, measured in one run.
    """
    if images.labels is None:
        raise ValueError("zero-shot needs labelled images (embed_images(..., labels=True))")
    t0 = time.perf_counter()
    tname, tlist = load_templates(templates)
    desc = load_descriptions(descriptions, classnames) if descriptions else None
    cls = class_embeddings(
        model, classnames, tlist, desc, cache=cache, fingerprint=fingerprint,
        batch_size=text_batch_size, precision=precision, progress=progress,
    )  # fmt: skip
    metrics, conf = zeroshot_metrics(images.emb, cls, images.labels)
    out: dict[str, Any] = {
        "task": "zeroshot",
        "templates": tname,
        "n_templates": len(tlist),
        "descriptions": str(descriptions) if descriptions else None,
        "metrics": metrics,
        "seconds_text": time.perf_counter() - t0,
        "confusion": conf.tolist() if len(classnames) <= 100 else None,  # 1000 classes: PNG only
    }
    if desc is not None and baseline:
        base = class_embeddings(
            model, classnames, tlist, None, cache=cache, fingerprint=fingerprint,
            batch_size=text_batch_size, precision=precision, progress=progress,
        )  # fmt: skip
        out["templates_only"] = zeroshot_metrics(images.emb, base, images.labels)[0]
    if confusion_png and dist.is_main():
        out["confusion_png"] = str(plot_confusion(conf, classnames, confusion_png))
    return out


def run_retrieval(
    model: Any,
    images: ImageSet,
    *,
    text_batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Image<->text Recall@1/5/10 of embedded images with captions -> result entry."""
    if images.captions is None:
        raise ValueError("retrieval needs captions (embed_images(..., captions=True))")
    t0 = time.perf_counter()
    texts, t2i = flatten_captions(images.captions)
    temb = embed_texts(
        model,
        texts,
        batch_size=text_batch_size,
        precision=precision,
        progress=progress,
        desc="embed captions",
    )
    seconds_text = time.perf_counter() - t0
    metrics = recall_at_k(images.emb, temb, t2i)
    metrics.update(n_images=len(images), n_texts=len(texts))
    return {
        "task": "retrieval",
        "templates": None,
        "metrics": metrics,
        "seconds_text": seconds_text,
        "texts_per_s": len(texts) / max(seconds_text, 1e-9),
    }


def run_probe(
    images: ImageSet,
    n_classes: int,
    *,
    fractions: tuple[float, float, float] = (0.5, 0.1, 0.4),
    seed: int = 0,
    k_shot: int | None = None,
    solver: str = "auto",
) -> dict[str, Any]:
    """Linear probe on a seeded stratified split of labelled embedded images -> result entry."""
    if images.labels is None:
        raise ValueError("the linear probe needs labelled images")
    y = images.labels
    tr, va, te = probe_split(y.numpy(), images.keys, fractions, seed)
    x = images.emb
    metrics = linear_probe(
        (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), n_classes, solver=solver, k_shot=k_shot, seed=seed
    )
    curve = metrics.pop("c_curve")
    return {
        "task": "probe",
        "templates": None,
        "split": {"fractions": list(fractions), "seed": seed, "sizes": [len(tr), len(va), len(te)]},
        "metrics": metrics,
        "c_curve": curve,
    }


def model_info(model: Any, fingerprint: str) -> dict[str, Any]:
    info = model.describe() if hasattr(model, "describe") else {"spec": type(model).__name__}
    info["fingerprint"] = fingerprint
    info["preprocess"] = model.preprocess.cfg.to_dict() if hasattr(model, "preprocess") else None
    return info


def evaluate(
    model: Any,
    datasets: list[str | DatasetSpec] | tuple[str | DatasetSpec, ...] = ("cifar10", "flickr8k"),
    config: EvalConfig | dict[str, Any] | None = None,
    *,
    images: dict[str, ImageSet] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on each dataset (built-in name or :class:`DatasetSpec`) -> result dict.

    ``config`` (an :class:`EvalConfig` or a dict) holds every knob; keyword ``overrides`` name its
    fields (the old keyword names ``output_dir=`` and ``cache=PATH`` still work). ``config.tasks``
    restricts which tasks run (default: each dataset's own). ``images`` (a dict keyed by dataset name)
    may supply precomputed :class:`ImageSet` s, which are then not embedded again; the sets embedded
    here are added to it, so the caller can reuse them. With ``config.output`` the dict is saved as
    ``results.json`` (+ confusion PNGs) and the full run config as ``config.yaml``, on rank 0.
    """
    from clipforge.config import write_run_config
    from clipforge.utils import write_json

    cfg = eval_config(config, **overrides)
    t_all = time.perf_counter()
    fp = model_fingerprint(model)
    specs = [d if isinstance(d, DatasetSpec) else builtin(d, cfg.data_root) for d in datasets]
    out_dir = Path(cfg.output) if cfg.output else None
    cache: bool | str = cfg.cache_dir if (cfg.cache and cfg.cache_dir) else cfg.cache
    results: list[dict[str, Any]] = []
    for spec in specs:
        wanted = [t for t in spec.tasks if cfg.tasks is None or t in cfg.tasks]
        if not wanted:
            continue
        bad = [t for t in wanted if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}: use {TASKS}")
        need_labels = bool({"zeroshot", "probe"} & set(wanted))
        need_caps = "retrieval" in wanted
        imgs = images.get(spec.name) if images is not None else None
        if imgs is None:
            imgs = embed_images(
                model, spec.shards, labels=need_labels, captions=need_caps, batch_size=cfg.batch_size,
                workers=cfg.workers, image_size=cfg.image_size, channels_last=cfg.channels_last,
                precision=cfg.precision, progress=cfg.progress, desc=f"embed {spec.name}",
            )  # fmt: skip
            if images is not None:
                images[spec.name] = imgs  # hand the embeddings back (e.g. for a retrieval grid)
        common = {
            "dataset": spec.name,
            "shards": shard_fingerprint(spec.shards, contents=cfg.hash_contents),
            "n_images": len(imgs),
            "bad_samples": imgs.bad.to_dict(),
            "seconds_images": imgs.seconds,
            "images_per_s": len(imgs) / max(imgs.seconds, 1e-9),
        }
        classnames = load_classnames(spec.classnames) if spec.classnames else None
        if need_labels and classnames is None:
            raise ValueError(f"{spec.name}: zero-shot/probe need a class-names file")
        for task in wanted:
            t0 = time.perf_counter()
            if task == "zeroshot":
                png = out_dir / f"confusion_{spec.name}.png" if out_dir else None
                desc = cfg.descriptions
                if desc == "generate":  # CuPL: the LLM writes them (cached next to the results)
                    desc = generated_descriptions(spec.name, classnames, cfg)
                r = run_zeroshot(
                    model, imgs, classnames, cfg.templates or spec.templates, desc,
                    confusion_png=png, cache=cache, fingerprint=fp, text_batch_size=cfg.text_batch_size,
                    precision=cfg.precision, progress=cfg.progress, baseline=True,
                )  # fmt: skip
            elif task == "probe":
                r = run_probe(imgs, len(classnames), fractions=spec.probe_fractions, seed=cfg.probe_seed,
                              k_shot=cfg.k_shot, solver=cfg.solver)  # fmt: skip
            else:
                r = run_retrieval(
                    model, imgs, text_batch_size=cfg.text_batch_size, precision=cfg.precision,
                    progress=cfg.progress,
                )  # fmt: skip
            r.update(common)
            r["seconds_task"] = time.perf_counter() - t0
            results.append(r)
    rank, world = dist.rank_world()
    report = {
        "clipforge_eval": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(model, fp),
        "settings": {
            "batch_size": cfg.batch_size,
            "image_size": cfg.image_size
            or (model.preprocess.cfg.size if hasattr(model, "preprocess") else None),
            "channels_last": cfg.channels_last,
            "precision": cfg.precision,
            "solver": cfg.solver,
            "k_shot": cfg.k_shot,
            "world_size": world,
            "torch_threads": torch.get_num_threads(),
        },
        "results": results,
        "seconds": time.perf_counter() - t_all,
    }
    if out_dir is not None and rank == 0:
        write_json(out_dir / "results.json", report)
        write_run_config(out_dir / "config.yaml", run_record(model, fp, specs, cfg))
    return report


def generated_descriptions(dataset: str, classnames: list[str], cfg: EvalConfig) -> Path:
    """``--descriptions generate``: CuPL descriptions by ``cfg.llm``, cached as
    OUTPUT/descriptions_DATASET.json (or under the class-embedding cache without an output dir)."""
    from clipforge.evaluate.cupl import cached_descriptions
    from clipforge.evaluate.zeroshot import cache_dir

    if not cfg.llm:
        raise ValueError("--descriptions generate needs --llm (smollm2, an HF causal-LM dir or a .gguf file)")
    root = Path(cfg.output) if cfg.output else Path(cfg.cache_dir or cache_dir()) / "cupl"
    return cached_descriptions(root / f"descriptions_{dataset}.json", classnames, cfg.llm)


def run_record(model: Any, fp: str, specs: list[DatasetSpec], cfg: EvalConfig) -> EvalRun:
    """What ``config.yaml`` holds: the model, the datasets as resolved (shards, class names, tasks),
    the config."""
    spec = getattr(getattr(model, "config", None), "spec", type(model).__name__)
    datasets = [
        {"name": d.name, "shards": d.shards if isinstance(d.shards, str) else [str(x) for x in d.shards],
         "classnames": str(d.classnames) if d.classnames else None, "tasks": list(d.tasks)}
        for d in specs
    ]  # fmt: skip
    return EvalRun(str(spec), fp, datasets, cfg)


def summary_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[dataset, task, metric, value]`` of the headline numbers, for ``format_table``."""
    keep = {
        "zeroshot": ("top1", "top5", "mean_per_class_recall"),
        "probe": ("top1", "mean_per_class_recall", "best_C"),
        "retrieval": tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
    }
    keep["captioning"] = ("bleu4", "cider_d", "meteor", "rouge_l", "clip_score", "self_r@1")
    keep["compositionality"] = ("accuracy", "blind_accuracy")
    keep["robustness"] = ("top1_clean", "top1_s1", "top1_s2", "top1_s3")
    rows = []
    for r in report["results"]:
        for m in keep.get(r["task"].split("/")[0], ()):
            if isinstance(r["metrics"].get(m), (int, float)):
                rows.append([r["dataset"], r["task"], m, float(r["metrics"][m])])
        if r.get("templates_only"):  # --descriptions: the same run without them
            rows.append(
                [r["dataset"], "zeroshot, templates only", "top1", float(r["templates_only"]["top1"])]
            )
        if "images_per_s" in r:  # captioning rows have no image-embedding pass of their own
            rows.append([r["dataset"], r["task"], "images/s", float(np.round(r["images_per_s"], 1))])
    return rows


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat ``{"<dataset>/<task>/<metric>": value}`` of every numeric metric (for quickstart reports)."""
    out = {}
    for r in report["results"]:
        for m, v in r["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and m != "fit_seconds":
                out[f"{r['dataset']}/{r['task']}/{m}"] = float(v)
    return out


__all__ = [
    "EvalConfig",
    "evaluate",
    "headline_metrics",
    "run_probe",
    "run_retrieval",
    "run_zeroshot",
    "summary_rows",
]
