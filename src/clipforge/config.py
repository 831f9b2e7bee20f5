"""One config convention for every stage: typed (nested) dataclasses, strict loading, generated flags.

Why one module: a typo in a config file or ``--model-opt`` must fail loudly with a did-you-mean, the
defaults must live in exactly one place (the dataclass), and every run writes the config it used next
to its outputs so a resume can check it continues the same thing.

    @dataclass
    class DedupConfig:
        threshold: float = field(default=0.95, metadata={"help": "cosine above which two are copies"})

    @dataclass
    class CurateConfig:
        batch_size: int = 64
        dedup: DedupConfig = field(default_factory=DedupConfig)

    cfg = from_dict(CurateConfig, {"batch_size": 32, "dedup": {"threshold": 0.9}})
    add_arguments(parser, CurateConfig)          # --batch-size, --dedup.threshold (SUPPRESS defaults)
    cfg = from_args(CurateConfig, args, base=cfg) # only the flags the user gave override ``base``
    write_run_config(out_dir / "config.yaml", cfg); check_run_config(out_dir / "config.yaml", cfg)

Rules: unknown keys raise :class:`ConfigError` (a ``ValueError``) naming the closest valid key; nested
dataclass fields take dicts; tuples round-trip through lists; ``dict`` fields are free-form option maps
(check them with :func:`check_keys` where the valid keys are known).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used as given (unknown key, wrong type, mismatch on resume)."""


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (and e.g. ``choices``) where :func:`add_arguments` reads it.

    List/dict defaults are copied per instance (no shared mutable default).
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or a list of valid ones when nothing is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})" if choices else ""


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``d`` not in ``allowed``."""
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise ConfigError(f"unknown {where} key {k!r}{did_you_mean(str(k), allowed)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], d: Mapping[str, Any] | T | None, where: str | None = None) -> T:
    """Build ``cls`` from a (nested) dict, rejecting unknown keys; an instance passes through.

    Runs ``validate()`` on the result when the class defines it.
    """
    if isinstance(d, cls):
        return d
    where = where or cls.__name__
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    check_keys(d, names, where)
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        tp, _ = _unwrap_optional(hints.get(k, Any))
        if _is_config(tp) and isinstance(v, Mapping):
            v = from_dict(tp, v, f"{where}.{k}")
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass: what YAML/JSON files hold."""
    return _plain(dataclasses.asdict(obj))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def load_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON, a subset) config file -> dict."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


# -- command-line flags generated from fields ----------------------------------------------------------


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def parse_kv(items: Iterable[str], where: str = "option") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values parsed as YAML scalars: ints, floats, bools)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else v
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
    prefix: str = "",
    rename: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of ``cls`` (nested configs as ``--sub.field``), default ``SUPPRESS``.

    Defaults stay in the dataclass: a flag the user did not give does not appear in the namespace, so
    :func:`from_args` overrides only what was given. Help comes from ``field(metadata={"help": ...})``.
    ``rename`` maps a field to another flag name (e.g. ``{"model_opts": "model-opt"}``).
    """
    skip = set(skip)
    rename = dict(rename or {})
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints.get(f.name, str))
        if _is_config(tp):
            add_arguments(parser, tp, prefix=f"{prefix}{f.name}.", skip={s.split(".", 1)[1] for s in skip
                                                                       if s.startswith(f.name + ".")})
            continue
        flag = "--" + rename[f.name] if f.name in rename else _flag(prefix, f.name)
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f.metadata.get("help", "")
        if default is not None and not isinstance(default, bool):
            helptext = f"{helptext} (default: {default})".strip()
        kw["help"] = helptext or None
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (list, typing.List) or tp is list:  # noqa: UP006
            (item,) = typing.get_args(tp) or (str,)
            kw.update(nargs="+", type=item if item in (int, float) else str)
        elif origin in (dict, typing.Dict) or tp is dict:  # noqa: UP006
            kw.update(action="append", metavar="KEY=VALUE", type=str)
        elif origin is tuple:
            args = typing.get_args(tp)
            kw.update(nargs=len(args), type=args[0] if args else str)
        elif tp in (int, float):
            kw["type"] = _optional_number(tp) if optional else tp
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def _optional_number(tp: type):
    def conv(s: str):
        return None if s.lower() in ("none", "null") else tp(s)

    conv.__name__ = tp.__name__
    return conv


def from_args(cls: type[T], args: argparse.Namespace, base: T | Mapping[str, Any] | None = None) -> T:
    """``base`` (instance, dict or None) overridden by the flags present in ``args`` (see add_arguments)."""
    d = to_dict(base) if dataclasses.is_dataclass(base) else dict(base or {})
    given = vars(args)
    hints = _hints(cls)

    def apply(target: dict[str, Any], klass: type, prefix: str) -> None:
        h = _hints(klass)
        for f in dataclasses.fields(klass):
            tp, _ = _unwrap_optional(h.get(f.name, str))
            if _is_config(tp):
                sub = dict(target.get(f.name) or {})
                apply(sub, tp, f"{prefix}{f.name}.")
                if sub:
                    target[f.name] = sub
                continue
            key = prefix + f.name
            if key not in given:
                continue
            v = given[key]
            origin = typing.get_origin(tp)
            if (origin in (dict, typing.Dict) or tp is dict) and isinstance(v, list):  # noqa: UP006
                v = {**(target.get(f.name) or {}), **parse_kv(v, _flag(prefix, f.name))}
            target[f.name] = v

    del hints
    apply(d, cls, "")
    return from_dict(cls, d)


# -- the run's config beside its outputs ---------------------------------------------------------------


def write_run_config(path: str | Path, cfg: Any) -> None:
    """Atomically write the full resolved config (YAML) next to a run's outputs."""
    from clipforge.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_configs(va, vb, f"{prefix}{k}.")
        elif _plain(va) != _plain(vb):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def check_run_config(path: str | Path, cfg: Any, ignore: Iterable[str] = ()) -> None:
    """On resume: the saved config must equal ``cfg`` except the dotted keys in ``ignore``."""
    path = Path(path)
    if not path.is_file():
        return
    saved = load_file(path)
    ignore = set(ignore)
    diffs = [d for d in diff_configs(saved, to_dict(cfg)) if d.split(":", 1)[0] not in ignore]
    if diffs:
        raise ConfigError(
            f"{path} was written by a run with other settings; resuming would mix them: "
            + "; ".join(diffs[:8])
            + " (use a new output dir, or --overwrite to start over)"
        )
