"""``clipforge train``: flags (or --config YAML, flags win) -> TrainConfig -> train -> table / JSON."""

from __future__ import annotations

import argparse
from typing import Any

# flag -> TrainConfig field, for flags whose default must not override a YAML value
_FIELDS = {
    "model": "model",
    "data": "data",
    "output": "output",
    "steps": "steps",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "wd": "wd",
    "warmup": "warmup",
    "loss": "loss",
    "accum": "accum",
    "precision": "precision",
    "workers": "workers",
    "save_every": "save_every",
    "seed": "seed",
    "grad_clip": "grad_clip",
    "device": "device",
    "cache": "cache",
    "cache_dir": "cache_dir",
    "threads": "threads",
    "multi_positive": "multi_positive",
    "shuffle_buffer": "shuffle_buffer",
}


def _value(s: str) -> Any:
    """'1' -> 1, '0.5' -> 0.5, 'true' -> True, else the string."""
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a CLIP/SigLIP model on shards (DDP under torchrun, exact resume)",
        description="Train a CLIP-family model on webdataset shards. Run under torchrun for data parallel.",
    )
    p.add_argument("--config", help="YAML file of TrainConfig fields (command-line flags override it)")
    p.add_argument(
        "--model", help="model spec or saved dir: towers:IMG+TXT, hf:PATH, scratch:NAME, py:mod:fn"
    )
    p.add_argument(
        "--model-opt", action="append", default=[], metavar="K=V", help="kwarg for load_model (repeat)"
    )
    p.add_argument("--data", nargs="+", help="shard specs: paths, globs, brace ranges, dirs, urls")
    p.add_argument("--output", help="run directory (checkpoints, metrics, final model)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--epochs", type=float, help="passes over the data (steps = epochs * samples // batch)")
    n.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (all ranks and micro-batches)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--wd", type=float, help="decoupled weight decay (not on norms/biases/scale)")
    p.add_argument("--warmup", type=int, help="linear warmup steps before cosine decay")
    p.add_argument("--loss", choices=["clip", "siglip"])
    p.add_argument(
        "--multi-positive", type=int, nargs="?", const=2, help="K captions per image, all positives"
    )
    p.add_argument("--accum", type=int, help="GradCache micro-batches per step (same contrastive batch)")
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--grad-clip", type=float, help="max global grad norm (0 = off)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None, help="if the model supports it")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the embedding steps")
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard the trainable towers with FSDP2 (heads stay replicated)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, help="streaming shuffle buffer (samples)")
    p.add_argument("--cache", choices=["auto", "off"], help="cache locked-tower features (auto)")
    p.add_argument("--cache-dir", help="feature cache root (default: beside OUTPUT)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (and always at the end)")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue from OUTPUT's latest checkpoint"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> Any:
    from clipforge.train.config import TrainConfig

    d: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            d.update(yaml.safe_load(f) or {})
    for flag, fld in _FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            d[fld] = v
    if args.steps is not None:
        d.pop("epochs", None)
    if args.epochs is not None:
        d.pop("steps", None)
    if args.grad_clip is not None and args.grad_clip <= 0:
        d["grad_clip"] = None
    for flag in ("grad_checkpointing", "compile", "resume", "fsdp"):
        if getattr(args, flag):
            d[flag] = True
    if args.no_progress:
        d["progress"] = False
    if args.model_opt:
        opts = dict(d.get("model_opts") or {})
        for kv in args.model_opt:
            k, sep, v = kv.partition("=")
            if not sep:
                raise SystemExit(f"--model-opt expects KEY=VALUE, got {kv!r}")
            opts[k] = _value(v)
        d["model_opts"] = opts
    return TrainConfig.from_any(d)


def run_cli(args: argparse.Namespace) -> int:
    from clipforge.train.loop import train
    from clipforge.utils import emit_json, format_table

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"clipforge train: {e}") from None
    result = train(cfg)
    import os

    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if args.json:
        emit_json(result)
    else:
        rows = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list))]
        print(format_table(rows, ["key", "value"]))
    return 0
