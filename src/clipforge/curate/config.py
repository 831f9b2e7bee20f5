"""The knobs of a curation run, as one typed config (imports nothing heavy: the CLI builds flags from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DedupConfig:
    # of 64 bits: imagededup's pHash default. Corrupted-flickr8k proof: near-copy (2-6% crop, rescale,
    # JPEG 60-80) recall 0.82 at 10 vs 0.63 at 8; clean images with a neighbour that close: 0.4% vs 0.13%.
    phash_radius: int = 10
    phash_k: int = 16
    threshold: float = 0.95  # semantic duplicate cosine
    k: int = 8  # neighbours searched per sample
    nprobe: int = 8
    nlist: int | None = None  # k-means clusters; None = ~4 sqrt(N)
    exact_search_max: int = 50_000
    keep: str = "clip-score"  # or "centroid"
    eval_threshold: float = 0.92
    seed: int = 0
    chunk: int = 65_536  # query rows per search call (bounds the float32 working copy)


@dataclass
class BalanceConfig:
    t: int = 20_000
    concepts: str | None = None  # file with one concept per line; None = shipped list
    unmatched_prob: float = 0.0
    seed: int = 0


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
