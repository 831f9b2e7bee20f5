"""``clipforge train``: --config YAML + flags generated from TrainConfig's fields -> train -> table / JSON.

Every TrainConfig field is a flag (``--batch-size``, ``--model-opt K=V``, ``--no-progress``...; help
from the field metadata). ``--resume`` without ``--data`` continues the run in ``--output`` from its
own config.yaml (flags still override it); its shard list is data read back from a file, so it goes
through :func:`clipforge.data.shards.shards_from_file` (no ``pipe:`` command from it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipforge.config import add_arguments, from_args, load_file

# today's flag names that are not the field's name
RENAME = {"model_opts": "model-opt"}
HAND_MADE = ("multi_positive",)  # --multi-positive with no value means 2


def register(subparsers: argparse._SubParsersAction) -> None:
    from clipforge.train.config import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train a CLIP/SigLIP model on shards (DDP under torchrun, exact resume)",
        description="Train a CLIP-family model on webdataset shards. Run under torchrun for data parallel.",
    )
    p.add_argument("--config", help="YAML file of TrainConfig fields (command-line flags override it)")
    add_arguments(p, TrainConfig, skip=HAND_MADE, rename=RENAME)
    p.add_argument(
        "--multi-positive",
        dest="multi_positive",
        type=int,
        nargs="?",
        const=2,
        default=argparse.SUPPRESS,
        help=TrainConfig.__dataclass_fields__["multi_positive"].metadata["help"] + " (no value: 2)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.set_defaults(func=run_cli)


def saved_run_config(output: str | Path, model_given: bool = False) -> dict[str, Any]:
    """OUTPUT/config.yaml as a base for ``--resume``. It is data read back from a file: its shard list
    is refused if it names a command, its model if it names code (``py:``) unless ``--model`` is given."""
    from clipforge.config import ConfigError
    from clipforge.data.shards import shards_from_file
    from clipforge.models.registry import BACKENDS

    path = Path(output) / "config.yaml"
    d = load_file(path)
    d["data"] = shards_from_file(d.get("data") or [], source=str(path), expand=False)
    prefix = str(d.get("model", "")).partition(":")[0]
    if not model_given and prefix in BACKENDS and BACKENDS[prefix].runs_code:
        raise ConfigError(
            f"{path} names model {str(d['model'])[:200]!r}, which runs code: not taken from a file; "
            "give --model on the command line to resume it"
        )
    return d


def config_from_args(args: argparse.Namespace) -> Any:
    from clipforge.train.config import TrainConfig

    given = vars(args)
    base: dict[str, Any] = load_file(args.config) if getattr(args, "config", None) else {}
    output = given.get("output", base.get("output"))
    if given.get("resume") and "data" not in given and "data" not in base and output:
        if (Path(output) / "config.yaml").is_file():
            base = {**saved_run_config(output, model_given="model" in given), **base}
    for length, other in (("steps", "epochs"), ("epochs", "steps")):
        if length in given and other not in given:  # --steps replaces a file's epochs (and vice versa)
            base.pop(other, None)
    return from_args(TrainConfig, args, base=base)


def run_cli(args: argparse.Namespace, hooks: Any = None) -> int:
    """``hooks``: :class:`~clipforge.train.hooks.TrainHooks` (tests/train/train_with_hooks.py passes them)."""
    from clipforge.config import ConfigError
    from clipforge.data.shards import ShardSpecError
    from clipforge.runtime import rank_world
    from clipforge.train.loop import train
    from clipforge.utils import emit_json, format_table

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"clipforge train: {e}") from None
    try:
        result = train(cfg, hooks)
    except (ConfigError, ShardSpecError) as e:  # a model option, a resumed config, a refused shard spec
        raise SystemExit(f"clipforge train: {e}") from None
    if rank_world()[0] != 0:
        return 0
    if args.json:
        emit_json(result)
    else:
        rows = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list))]
        print(format_table(rows, ["key", "value"]))
    return 0
