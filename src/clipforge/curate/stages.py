"""What a stage function uses: the registry names, decoded images of a batch, shipped data files.

Stage modules import from here (``from clipforge.curate.stages import Batch, Context, register_stage,
batch_images``). The registry itself lives in :mod:`clipforge.curate.registry`, the resolution of
stage names in :mod:`clipforge.curate.plan`; this module imports no stage, so there is no cycle.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.curate.config import CurateConfig
from clipforge.curate.registry import STAGES, Batch, Columns, Context, Stage, register_stage
from clipforge.data.decode import SkipSample, decode_image

__all__ = [
    "STAGES",
    "Batch",
    "Columns",
    "Context",
    "CurateConfig",
    "Stage",
    "batch_images",
    "data_path",
    "read_json",
    "read_word_list",
    "register_stage",
]

DATA_DIR = resources.files("clipforge.curate") / "data"


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
