"""``index build`` configuration: BuildOptions (one CLI flag per field) and the run record ``config.yaml``.

A light module (no numpy/torch) so ``clipforge --help`` can generate the flags from the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipforge.config import ConfigError, from_dict
from clipforge.config import opt as _f


def parse_bytes(text: str | int) -> int:
    """'4GB', '512MiB', '2e9' -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "B")
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(float(s))




@dataclass
class BuildOptions:
    """How ``index build`` embeds and indexes; one CLI flag per field (index/cli.py generates them)."""

    index_type: str = _f("auto", "faiss index kind", choices=["auto", "flat", "ivfsq", "ivfpq", "hnsw"])
    ram_budget: int | str = _f("4GB", "memory the index may use, e.g. 512MB (picks IVF-PQ code size)")
    flat_threshold: int = _f(200_000, "auto: exact search up to this many vectors")
    refine: bool | None = _f(None, "SQ8 re-ranking for ivfpq: None = auto")
    dims: int | None = _f(None, "Matryoshka truncation to the first N dims")
    target_recall: float = _f(0.95, "tune nprobe/efSearch to this recall@10")
    eval_queries: int = _f(500, "queries used to measure recall")
    batch_size: int = _f(64, "images per forward pass")
    workers: int = _f(1, "DataLoader decode workers")
    thumb_size: int = _f(160, "thumbnail side in px (0: no thumbnails)")
    max_per_shard: int | None = _f(None, "embed at most N images per shard")
    seed: int = _f(0, "seed of the index training and the recall queries")
    runtime: str = _f(
        "torch",
        "torch | onnx: embed with the exported graphs in onnxruntime (same vectors to 1e-4, ~2x on CPU)",
        choices=["torch", "onnx"],
    )

    def __post_init__(self) -> None:
        self.ram_budget = parse_bytes(self.ram_budget)

    def validate(self) -> None:
        choices = self.__dataclass_fields__["index_type"].metadata["choices"]
        if self.index_type not in choices:
            raise ConfigError(f"index_type must be one of {choices}, got {self.index_type!r}")
        if self.runtime not in ("torch", "onnx"):
            raise ConfigError(f"runtime must be torch or onnx, got {self.runtime!r}")
        if self.refine not in (None, True, False):
            raise ConfigError(f"refine must be true, false or null (auto), got {self.refine!r}")
        for name in ("batch_size", "eval_queries", "flat_threshold"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.workers < 0
            or self.thumb_size < 0
            or (self.max_per_shard is not None and self.max_per_shard < 0)
        ):
            raise ConfigError("workers, thumb_size and max_per_shard must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildOptions:
        """Strict: an unknown key is an error with a did-you-mean (clipforge.config's one rule)."""
        return from_dict(cls, d)


@dataclass
class BuildRun:
    """What an index directory was built from: written as ``config.yaml``; a rerun with the same data
    and model resumes (complete parts are reused), a different build in the same dir is refused."""

    data: list[str]
    model: str
    model_fingerprint: str
    options: BuildOptions = field(default_factory=BuildOptions)


RUN_CONFIG = "config.yaml"
# options only change how parts are made (stale parts are rebuilt) or the index stage (always redone);
# the model is the same when its fingerprint is (a spec string and a saved dir may name one model)
RESUME_MAY_CHANGE = {"model", *(f"options.{n}" for n in BuildOptions.__dataclass_fields__)}
