"""Stage registry: a stage is a named batch function ``(batch, ctx) -> {column: values}``.

Why one tiny interface: the local engine and the Ray engine run the *same* functions, so a stage
written once runs on a laptop and on a cluster, and tests can call a stage directly on a hand-made
batch. Two kinds of stage exist:

- **sample** stages (``clip-score``, ``text``, ``image``, ``safety``) see a batch of samples of one
  shard, columnar: ``key``, ``shard``, ``image_bytes``, ``image_ext``, ``caption`` plus every column an
  earlier stage produced for that batch; they return new columns, one value per sample. Columns whose
  name starts with ``__`` (embeddings) are saved as ``.npy`` beside the score table, not in Parquet.
- **global** stages (``dedup``, ``balance``) need the whole shard set at once (clusters, counts); they
  take the merged score table (+ embeddings) instead and run after every shard is scored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.decode import SkipSample, decode_image

Batch = dict[str, Any]
Columns = dict[str, Any]

DATA_DIR = resources.files("clipforge.curate") / "data"


@dataclass
class CurateConfig:
    """Knobs of a curation run (saved into the run's manifest so a resume uses the same ones)."""

    stages: list[str] = field(default_factory=lambda: ["text", "image"])
    model: str | None = None  # clipforge model spec or saved dir; needed by clip-score / safety
    batch_size: int = 64
    image_size: int | None = None  # model input size override (cheaper scoring); None = model's own
    draft_size: int | None = None  # JPEG DCT-domain downscale at decode (see data.decode)
    lexicon: str | None = None  # visual noun lexicon; None = shipped
    safety_prompts: str | None = None  # safety prompt JSON; None = shipped
    langid_min_chars: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurateConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Context:
    """What stages share within one process: config, the model (loaded once, lazily), lexicons."""

    def __init__(self, config: CurateConfig, model: Any = None) -> None:
        self.config = config
        self._model = model
        self._cache: dict[str, Any] = {}
        self.timing: dict[str, float] = {}  # decode_s / model_s, for the throughput benchmark

    @property
    def model(self) -> Any:
        if self._model is None:
            if not self.config.model:
                raise ValueError(
                    "this stage needs a model: pass --model SPEC (e.g. towers:efficientnet-lite0+minilm-l6)"
                )
            from clipforge.models import load_model

            self._model = load_model(self.config.model).eval()
        return self._model

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """Per-process memo for expensive read-only helpers (lexicon sets, prompt embeddings)."""
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]


@dataclass
class Stage:
    name: str
    fn: Callable[..., Columns]
    kind: str  # "sample" | "global"
    needs_model: bool = False
    requires: tuple[str, ...] = ()  # stages that must run before (their columns are inputs)
    doc: str = ""


STAGES: dict[str, Stage] = {}


def register_stage(
    name: str, kind: str = "sample", needs_model: bool = False, requires: tuple[str, ...] = ()
) -> Callable[[Callable[..., Columns]], Callable[..., Columns]]:
    """Decorator: make a batch function available to ``clipforge curate run --stages NAME``."""

    def deco(fn: Callable[..., Columns]) -> Callable[..., Columns]:
        STAGES[name] = Stage(name, fn, kind, needs_model, requires, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def load_builtin_stages() -> dict[str, Stage]:
    """Import the modules that register the shipped stages (kept lazy so ``--help`` stays fast)."""
    from clipforge.curate import balance, clipscore, dedup, image, safety, text  # noqa: F401

    return STAGES


def resolve_stages(names: list[str]) -> list[Stage]:
    """Validate names, add required stages, and order them so requirements run first."""
    stages = load_builtin_stages()
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; available: {sorted(stages)}")
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for r in stages[n].requires:
            visit(r)
        order.append(n)

    for n in names:
        visit(n)
    samples = [stages[n] for n in order if stages[n].kind == "sample"]
    globs = [stages[n] for n in order if stages[n].kind == "global"]
    return samples + globs


# -- batch helpers -------------------------------------------------------------------------------
def batch_size_of(batch: Batch) -> int:
    return len(batch["key"])


def batch_images(batch: Batch, draft_size: int | None = None) -> list[Image.Image | None]:
    """Decoded RGB images of a batch (None where undecodable), memoized so stages decode once."""
    if "__images__" not in batch:
        imgs: list[Image.Image | None] = []
        errors: list[str | None] = []
        for data in batch["image_bytes"]:
            try:
                imgs.append(decode_image(data, draft_size))
                errors.append(None)
            except SkipSample as e:
                imgs.append(None)
                errors.append(e.reason)
        batch["__images__"] = imgs
        batch["__image_errors__"] = errors
    return batch["__images__"]


def data_path(name: str | None, default: str) -> Path:
    """A user-given data file, or the shipped one under clipforge/curate/data/."""
    if name:
        p = Path(name)
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        return p
    return Path(str(DATA_DIR / default))


def read_word_list(path: Path) -> list[str]:
    """One entry per line; ``#`` comments and blank lines ignored; lowercased; order kept, deduped."""
    out = [ln.strip().lower() for ln in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(w for w in out if w and not w.startswith("#")))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
