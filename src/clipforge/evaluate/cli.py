"""``clipforge eval zeroshot|retrieval|probe|captioning|run|compare``: argparse wiring only (heavy imports in handlers).

Data-parallel: ``torchrun --nproc_per_node N -m clipforge.cli eval run --model ...`` shards the samples
over ranks; rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


ZS_FIELDS = {"templates", "descriptions"}
PROBE_FIELDS = {"k_shot", "solver", "probe_seed"}
CLI_ONLY_SKIP = {"progress", "tasks"}  # the subcommand names the task; tqdm always goes to stderr


def _args(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """--model, --json, --threads by hand; every EvalConfig field as a generated flag (minus ``skip``)."""
    from clipforge.config import add_arguments
    from clipforge.evaluate.config import RENAME, EvalConfig

    p.add_argument("--model", required=True, help="model spec or saved model dir (see clipforge.models)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g = p.add_argument_group("evaluation settings (EvalConfig)")
    add_arguments(g, EvalConfig, skip=CLI_ONLY_SKIP | set(skip), rename=RENAME)


def _data_args(p: argparse.ArgumentParser, labels: bool) -> None:
    p.add_argument("--dataset", default=None, help="built-in dataset: cifar10 | flickr8k, or wds:DIR "
                   "(a CLIP_benchmark webdataset dir; wds:DIR/SPLIT for a split other than test)")  # fmt: skip
    p.add_argument("--shards", nargs="+", default=None, help="your own shards (paths, globs, brace ranges)")
    if labels:
        p.add_argument("--classnames", default=None, help="class-names file, one per line in label order")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: zero-shot, retrieval, probe, captioning, compositionality, robustness"
    )
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    sub.required = True

    z = sub.add_parser("zeroshot", help="zero-shot classification (top-1/top-5/mean per-class recall)")
    _args(z, skip=PROBE_FIELDS)
    _data_args(z, labels=True)
    z.set_defaults(func=_task_handler("zeroshot"))

    r = sub.add_parser("retrieval", help="image<->text Recall@1/5/10 (several captions per image)")
    _args(r, skip=ZS_FIELDS | PROBE_FIELDS)
    _data_args(r, labels=False)
    r.set_defaults(func=_task_handler("retrieval"))

    pr = sub.add_parser("probe", help="linear probe (logistic regression, C chosen on a val split)")
    _args(pr, skip=ZS_FIELDS)
    _data_args(pr, labels=True)
    pr.set_defaults(func=_task_handler("probe"))

    cap = sub.add_parser(
        "captioning",
        help="a captioner on reference captions: BLEU/METEOR/ROUGE-L/CIDEr-D, CLIPScore, baselines",
        description="Flags come from CaptionEvalConfig (caption/evaluate.py); --data defaults to the "
        "flickr8k test shard under --data-root. Writes OUTPUT/results.json (the eval result layout).",
    )
    _caption_args(cap)
    cap.set_defaults(func=cmd_captioning)

    comp = sub.add_parser(
        "compositionality",
        help="hard-negative caption selection (SugarCrepe/ARO-style probes) next to a blind text-only LM",
        description="Flags come from CompositionalityConfig (evaluate/config.py). Writes OUTPUT/results.json "
        "and OUTPUT/probes.jsonl (reusable with --probes).",
    )
    from clipforge.evaluate.config import CompositionalityConfig, RobustnessConfig

    _model_task_args(comp, CompositionalityConfig, "probe settings")
    comp.set_defaults(func=cmd_compositionality)

    rob = sub.add_parser(
        "robustness",
        help="zero-shot accuracy under Gaussian noise / blur / JPEG / contrast at 3 severities (a curve)",
        description="Flags come from RobustnessConfig (evaluate/config.py). Writes OUTPUT/results.json and "
        "OUTPUT/robustness.png.",
    )
    _model_task_args(rob, RobustnessConfig, "robustness settings")
    rob.set_defaults(func=cmd_robustness)

    run = sub.add_parser("run", help="all tasks of the built-in datasets (cifar10 + flickr8k by default)")
    _args(run)
    run.add_argument("--datasets", default="cifar10,flickr8k", help="comma-separated built-in datasets "
                     "and/or wds:DIR (CLIP_benchmark webdataset dirs)")  # fmt: skip
    run.add_argument("--captioner", default=None, help="also score this captioner dir on flickr8k test "
                     "(CLIPScore/self-retrieval by --model)")  # fmt: skip
    run.add_argument("--caption-limit", type=int, default=None, help="captioning: only the first N images")
    run.add_argument("--compositionality", action="store_true", help="also run generated compositionality "
                     "probes on flickr8k test (reusing its embeddings)")  # fmt: skip
    run.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="metric deltas between two results.json files (B - A)")
    c.add_argument("a", help="baseline results.json")
    c.add_argument("b", help="results.json to compare")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.set_defaults(func=cmd_compare)


def _caption_args(p: argparse.ArgumentParser) -> None:
    from clipforge.caption.evaluate import CaptionEvalConfig
    from clipforge.config import add_arguments

    p.add_argument("--output", default=None, help="results dir (default: runs/eval-captioning)")
    p.add_argument("--data-root", default=None, help="dir with flickr8k/ (when --data is not given)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_arguments(p.add_argument_group("captioning settings (CaptionEvalConfig)"), CaptionEvalConfig)


def _flickr_test(data_root: str | None) -> list[str]:
    from clipforge.evaluate.recipes import builtin

    return [builtin("flickr8k", data_root).shards]


def cmd_captioning(args: argparse.Namespace) -> int:
    from clipforge.caption.evaluate import CaptionEvalConfig
    from clipforge.config import ConfigError, from_args
    from clipforge.evaluate.captioning import HEADLINE, caption_rows, captioning_report
    from clipforge.utils import default_output, emit_json, format_table, setup_torch_threads, write_json

    setup_torch_threads(args.threads)
    out = args.output or str(default_output("eval-captioning"))
    try:
        cfg = from_args(CaptionEvalConfig, args)
        report = captioning_report(cfg, list(cfg.data) or _flickr_test(args.data_root))
    except (FileNotFoundError, ValueError, ConfigError) as e:
        if args.json:
            emit_json({"error": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(f"{out}/results.json", report)
    if args.json:
        emit_json({**report, "output": out})
        return 0
    print(format_table(caption_rows(report), ["task", *HEADLINE]))
    r0 = report["results"][0]
    own = " (the captioner's own encoder: biased)" if r0.get("scoring_model_is_encoder") else ""
    print(f"scoring model: {r0.get('scoring_model')}{own}")
    print(f"saved {out}/results.json ({report['seconds']:.1f} s)", file=sys.stderr)
    return 0


def _add_captioning(args: argparse.Namespace, cfg: Any, report: dict[str, Any]) -> None:
    """``eval run --captioner DIR``: the captioner's rows join the run's results (and results.json)."""
    from clipforge.caption.evaluate import CaptionEvalConfig
    from clipforge.evaluate.captioning import captioning_report
    from clipforge.utils import write_json

    ccfg = CaptionEvalConfig(captioner=args.captioner, limit=args.caption_limit, workers=cfg.workers)
    cap = captioning_report(ccfg, _flickr_test(cfg.data_root), scoring_model=args.model)
    report["results"].extend(cap["results"])
    report["captioning"] = {"model": cap["model"], "settings": cap["settings"], "samples": cap["samples"],
                            "seconds": cap["seconds"]}  # fmt: skip
    if cfg.output:
        write_json(f"{cfg.output}/results.json", report)


def _model_task_args(p: argparse.ArgumentParser, cls: type, title: str) -> None:
    """``--model``, ``--threads``, ``--json`` + flags generated from a task's config dataclass."""
    from clipforge.config import add_arguments

    p.add_argument("--model", required=True, help="model spec or saved model dir (see clipforge.models)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_arguments(p.add_argument_group(f"{title} ({cls.__name__})"), cls, skip={"progress"})


def _model_task(args: argparse.Namespace, cls: type, run: Any, name: str, show: Any, also_saved: str) -> int:
    """Load the model, run one config-driven task, print its table or one JSON object; exit 2 on bad input."""
    from clipforge.config import ConfigError, from_args
    from clipforge.utils import default_output, emit_json, setup_torch_threads

    setup_torch_threads(args.threads)
    try:
        from clipforge.models import load_model

        cfg = from_args(cls, args, base={"output": str(default_output(name))})
        report = run(load_model(args.model, allow_code=True), cfg)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        if args.json:
            emit_json({"error": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        emit_json({**report, "output": cfg.output})
        return 0
    show(report)
    print(f"saved {cfg.output}/results.json and {also_saved} ({report['seconds']:.1f} s)", file=sys.stderr)
    return 0


def _print_comp(report: dict[str, Any]) -> None:
    from clipforge.evaluate.compositionality import comp_rows
    from clipforge.utils import format_table

    heads = ["probe", "n", "model acc [95% CI]", "blind LM acc [95% CI]", "blind LM, unfiltered"]
    print(format_table(comp_rows(report), heads))
    r0 = report["results"][0] if report["results"] else {}
    print(f"blind filter: {r0.get('blind_filter', '-')}")


def cmd_compositionality(args: argparse.Namespace) -> int:
    from clipforge.evaluate.compositionality import run_compositionality
    from clipforge.evaluate.config import CompositionalityConfig

    return _model_task(args, CompositionalityConfig, run_compositionality, "eval-compositionality",
                       _print_comp, "probes.jsonl")  # fmt: skip


def _add_compositionality(args: argparse.Namespace, cfg: Any, model: Any, report: dict[str, Any],
                          images: dict[str, Any]) -> None:  # fmt: skip
    """``eval run --compositionality``: generated probes on flickr8k test, its embeddings reused."""
    from clipforge.evaluate.compositionality import run_compositionality
    from clipforge.evaluate.config import CompositionalityConfig
    from clipforge.utils import write_json

    ccfg = CompositionalityConfig(data_root=cfg.data_root, llm=cfg.llm, workers=cfg.workers,
                                  precision=cfg.precision, progress=cfg.progress,
                                  output=f"{cfg.output}/compositionality" if cfg.output else None)  # fmt: skip
    comp = run_compositionality(model, ccfg, images=images.get("flickr8k"))
    report["results"].extend(comp["results"])
    if cfg.output:
        write_json(f"{cfg.output}/results.json", report)


def cmd_robustness(args: argparse.Namespace) -> int:
    from clipforge.evaluate.config import RobustnessConfig
    from clipforge.evaluate.robustness import robustness_rows, run_robustness
    from clipforge.utils import format_table

    def show(report: dict[str, Any]) -> None:
        print(format_table(robustness_rows(report), ["corruption", "clean", "s1", "s2", "s3"]))

    return _model_task(args, RobustnessConfig, run_robustness, "eval-robustness", show, "robustness.png")


def _task_handler(task: str):
    def handler(args: argparse.Namespace) -> int:
        return _run(args, task=task)

    return handler


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args, task=None)


def _dataset_spec(args: argparse.Namespace, task: str):
    from clipforge.evaluate.recipes import DatasetSpec, builtin

    if bool(args.dataset) == bool(args.shards):
        raise SystemExit("give exactly one of --dataset NAME or --shards ...")
    if args.dataset:
        spec = builtin(args.dataset, getattr(args, "data_root", None))
        if task not in spec.tasks:
            raise SystemExit(
                f"dataset {args.dataset} has no {task} task (it supports {', '.join(spec.tasks)})"
            )
        spec.tasks = (task,)
        return spec
    classnames = getattr(args, "classnames", None)
    if task != "retrieval" and not classnames:
        raise SystemExit(f"{task} on your own shards needs --classnames FILE")
    return DatasetSpec(name="custom", shards=args.shards, classnames=classnames, tasks=(task,))


def eval_config_from_args(args: argparse.Namespace) -> Any:
    """EvalConfig from the flags given (defaults from the dataclass); output defaults to runs/eval."""
    from clipforge.config import from_args
    from clipforge.evaluate.config import EvalConfig
    from clipforge.utils import default_output

    base = {"output": str(default_output("eval")), "progress": True}  # tqdm on stderr: stdout stays JSON
    return from_args(EvalConfig, args, base=base)


def load_eval_model(spec: str, cfg: Any, threads: int | None = None) -> Any:
    """``--model`` under ``--runtime torch|onnx`` (export.runtime.load_runtime: an onnx export dir runs
    as is, any other model is exported once into the cache by fingerprint). The onnx graphs are fp32 at
    the exported input size, so ``--precision bf16`` and ``--image-size`` are refused with onnx."""
    from clipforge.config import ConfigError
    from clipforge.export.runtime import is_onnx_export, load_runtime
    from clipforge.models import load_model

    runtime = cfg.runtime
    if is_onnx_export(spec) and runtime == "torch":
        raise ConfigError(f"{spec} is an onnx export: evaluate it with --runtime onnx")
    if runtime == "onnx":
        if cfg.precision != "fp32":
            raise ConfigError("--runtime onnx runs the fp32 graphs: drop --precision bf16")
        if cfg.image_size:
            raise ConfigError("--runtime onnx: the graphs take the exported input size; drop --image-size")
        if is_onnx_export(spec):
            return load_runtime(spec, "onnx", threads)
    model = load_model(spec, allow_code=True)  # --model is the user's own argument
    return model if runtime == "torch" else load_runtime(model, "onnx", threads)


def _run(args: argparse.Namespace, task: str | None) -> int:
    from clipforge.config import ConfigError
    from clipforge.evaluate import dist
    from clipforge.utils import emit_json, format_table, setup_torch_threads

    dist.init_from_env()
    setup_torch_threads(args.threads)
    try:
        import clipforge.models  # noqa: F401  (a clear error when the models package cannot load)
    except ImportError as e:
        print(f"error: the models package is not available: {e}", file=sys.stderr)
        return 2
    from clipforge.evaluate.recipes import builtin
    from clipforge.evaluate.runner import evaluate, summary_rows
    from clipforge.evaluate.wds import is_wds, prepare_images

    try:
        cfg = eval_config_from_args(args)
        datasets = (
            [_dataset_spec(args, task)]
            if task
            else [d.strip() for d in args.datasets.split(",") if d.strip()]
        )
        datasets = [builtin(d, cfg.data_root) if is_wds(d) else d for d in datasets]  # read wds: dirs now
        model = load_eval_model(args.model, cfg, args.threads)
        images: dict[str, Any] = {}
        prepare_images(model, datasets, cfg, images)  # wds retrieval sets: one caption per txt line
        report = evaluate(model, datasets, cfg, images=images)
        if task is None and getattr(args, "captioner", None) and dist.is_main():
            _add_captioning(args, cfg, report)
        if task is None and getattr(args, "compositionality", False) and dist.is_main():
            _add_compositionality(args, cfg, model, report, images)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not dist.is_main():
        return 0
    if args.json:
        slim = {
            **report,
            "results": [{k: v for k, v in r.items() if k != "confusion"} for r in report["results"]],
        }
        emit_json({**slim, "output": cfg.output})
    else:
        print(format_table(summary_rows(report), ["dataset", "task", "metric", "value"]))
        print(f"saved {cfg.output}/results.json ({report['seconds']:.1f} s)", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from clipforge.evaluate.results import compare, load_result
    from clipforge.utils import emit_json, format_table

    try:
        a, b = load_result(args.a), load_result(args.b)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, warnings = compare(a, b)
    if args.json:
        keys = ["task", "dataset", "metric", "a", "b", "delta"]
        emit_json({"rows": [dict(zip(keys, r)) for r in rows], "warnings": warnings,
                   "a": {"path": args.a, "model": a.get("model", {}).get("spec")},
                   "b": {"path": args.b, "model": b.get("model", {}).get("spec")}})  # fmt: skip
    else:
        print(format_table(rows, ["task", "dataset", "metric", "A", "B", "B-A"]))
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    return 0
