"""Named label sets and prompt templates for zero-shot classification."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# A short CLIP-style ensemble: averaging a few phrasings is steadier than one template.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
)


def read_labels(path: str | Path) -> list[str]:
    """One label per line; blank lines and ``#`` comments ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    if not out:
        raise ValueError(f"label set {path} is empty")
    return out


def builtin_label_sets() -> dict[str, Path]:
    """cifar10 ships here; imagenet comes from the models package's class list when present."""
    sets = {p.stem: p for p in sorted((HERE / "label_sets").glob("*.txt"))}
    imagenet = HERE.parent / "models" / "data" / "imagenet_classes.txt"
    if imagenet.is_file():
        sets.setdefault("imagenet", imagenet)
    return sets


def _json_list(s: str, what: str) -> list[str]:
    """A JSON list of strings (depth and type checked: a hostile body gets a ValueError, not a crash)."""
    import json

    try:
        vals = json.loads(s)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what}: invalid JSON list ({getattr(e, 'msg', 'nested too deeply')})") from None
    if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
        raise ValueError(f"{what}: JSON must be a list of strings")
    return vals


def parse_label_list(text: str) -> list[str]:
    """'cat, dog' or 'cat\\ndog' or a JSON list -> labels (stripped, order kept, duplicates dropped)."""
    s = text.strip()
    if s.startswith("["):
        vals = _json_list(s, "labels")
    else:
        vals = s.split("\n" if "\n" in s else ",")
    return list(dict.fromkeys(v.strip() for v in vals if v.strip()))


def split_template(template: str) -> tuple[str, str]:
    """``"a photo of a {}."`` -> ``("a photo of a ", ".")``; ValueError unless the template has exactly
    one bare ``{}`` (``{{`` and ``}}`` are literal braces): no index, name, attribute, conversion or
    format spec, since ``str.format`` on a client's template can pad to gigabytes or read attributes."""
    import string

    try:
        template.encode("utf-8")
        parts = list(string.Formatter().parse(template))
    except UnicodeEncodeError:
        raise ValueError(f"template {template[:80]!r} is not valid Unicode text") from None
    except ValueError as e:
        raise ValueError(f"template {template[:80]!r}: {e}") from None
    fields = [(name, spec, conv) for _, name, spec, conv in parts if name is not None]
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise ValueError(
            f"template {template[:80]!r} must contain exactly one bare '{{}}' (no name, index, "
            "conversion or format spec; write '{{' and '}}' for literal braces)"
        )
    at = next(i for i, p in enumerate(parts) if p[1] is not None)
    prefix = "".join(p[0] for p in parts[: at + 1])
    return prefix, "".join(p[0] for p in parts[at + 1 :])


def fill_template(template: str, label: str) -> str:
    """The prompt for ``label``: what ``template.format(label)`` gives for a valid template, built by
    concatenation so a template is never interpreted beyond its one placeholder."""
    prefix, suffix = split_template(template)
    return prefix + label + suffix


def parse_templates(
    text: str | None, max_count: int | None = None, max_chars: int | None = None
) -> tuple[str, ...]:
    """Templates as a JSON list or newline-separated, each checked by :func:`split_template`; count and
    length capped before any is parsed. None/blank -> DEFAULT_TEMPLATES."""
    if text is None or not text.strip():
        return DEFAULT_TEMPLATES
    s = text.strip()
    vals = _json_list(s, "templates") if s.startswith("[") else s.splitlines()
    out = tuple(v.strip() for v in vals if v.strip())
    if not out:
        raise ValueError("templates: none given")
    if max_count is not None and len(out) > max_count:
        raise ValueError(f"{len(out)} templates > limit {max_count}")
    for t in out:
        if max_chars is not None and len(t) > max_chars:
            raise ValueError(f"template of {len(t)} chars > limit {max_chars}")
        split_template(t)
    return out
