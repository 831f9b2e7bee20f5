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


def parse_label_list(text: str) -> list[str]:
    """'cat, dog' or 'cat\\ndog' or a JSON list -> labels (stripped, order kept, duplicates dropped)."""
    import json

    s = text.strip()
    if s.startswith("["):
        try:
            vals = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"labels: invalid JSON list ({e.msg})") from None
        if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
            raise ValueError("labels: JSON must be a list of strings")
    else:
        sep = "\n" if "\n" in s else ","
        vals = s.split(sep)
    out: list[str] = []
    for v in vals:
        v = v.strip()
        if v and v not in out:
            out.append(v)
    return out


def parse_templates(text: str | None) -> tuple[str, ...]:
    """Templates as a JSON list or newline-separated; each must contain ``{}`` exactly once."""
    import json

    if text is None or not text.strip():
        return DEFAULT_TEMPLATES
    s = text.strip()
    vals = json.loads(s) if s.startswith("[") else s.splitlines()
    out = tuple(v.strip() for v in vals if isinstance(v, str) and v.strip())
    if not out:
        raise ValueError("templates: none given")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
    return out
