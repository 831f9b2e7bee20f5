"""The knobs of a curation run as one typed, nested config: the single source of truth.

Why here and light: ``curate/cli.py`` generates its flags from these fields (``--dedup.threshold``),
a run writes the full config to ``OUT/config.yaml`` (and ``manifest.json``) and a resume is checked
against it, so no setting rides on the side (dedup/balance used to live in ``ctx._cache`` and never
reached the manifest). Loading is strict (:func:`clipforge.config.from_dict`): an unknown key fails
with a did-you-mean. This module imports no numpy/torch: ``clipforge --help`` builds flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipforge.config import ConfigError, from_dict, to_dict

DEFAULT_STAGES = ["clip-score", "text", "image", "dedup"]
KEEP = ("clip-score", "centroid")
NEAR_RULES = ("or", "and", "phash", "descriptor")


def _h(text: str, **kw: Any) -> dict[str, Any]:
    return {"help": text, **kw}


def _check_numbers(obj: Any, where: str) -> None:
    """Numeric fields hold numbers (a YAML typo like ``t: 2O000`` fails here, not deep in a stage)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, tp = getattr(obj, f.name), hints[f.name]
        want = int if tp in (int, int | None) else float if tp in (float, float | None) else None
        if want is None or (v is None and tp != want):
            continue
        ok = isinstance(v, int) if want is int else isinstance(v, (int, float))
        if not ok or isinstance(v, bool):
            raise ConfigError(f"{where}{f.name} must be {want.__name__}, got {v!r}")


@dataclass
class DedupConfig:
    """Settings of the ``dedup`` stage (exact, pHash, SemDeDup and eval-set duplicates)."""

    # of 64 bits: imagededup's pHash default. Corrupted-flickr8k proof: near-copy (2-6% crop, rescale,
    # JPEG 60-80) recall 0.82 at 10 vs 0.63 at 8; clean images with a neighbour that close: 0.4% vs 0.13%.
    phash_radius: int = field(default=10, metadata=_h("near-duplicate pHash Hamming radius (of 64 bits)"))
    phash_k: int = field(default=16, metadata=_h("pHash neighbours searched per sample"))
    threshold: float = field(default=0.95, metadata=_h("SemDeDup cosine threshold"))
    k: int = field(default=8, metadata=_h("semantic neighbours searched per sample"))
    nprobe: int = field(default=8, metadata=_h("k-means clusters probed per search (large sets)"))
    nlist: int | None = field(default=None, metadata=_h("k-means clusters (default ~4 sqrt(N))"))
    exact_search_max: int = field(default=50_000, metadata=_h("exact search up to this many rows"))
    keep: str = field(
        default="clip-score", metadata=_h("which member of a duplicate group to keep", choices=list(KEEP))
    )
    eval_threshold: float = field(default=0.92, metadata=_h("eval-set duplicate cosine threshold"))
    seed: int = field(default=0, metadata=_h("k-means seed"))
    chunk: int = field(default=65_536, metadata=_h("query rows per search call (bounds memory)"))
    # Near copies (copy stage, curate/copydetect.py): frozen pre-head descriptors, centered + normalized.
    # benchmarks/near_copies.py (EfficientNet-Lite0 trunk, flickr8k val, no labels): calibrated cut 0.64
    # for the descriptor alone, 0.73 for pHash OR descriptor; the fallback 0.8 errs on the precise side.
    copy_threshold: float | None = field(
        default=None,
        metadata=_h("copy-descriptor cosine threshold (default: calibrated on synthetic copies)"),
    )
    copy_lowpass: float = field(
        default=2.0,
        metadata=_h(
            "descriptors see each image scaled down this factor and back up (1: off; copydetect.lowpass)"
        ),
    )
    copy_precision: float = field(default=0.99, metadata=_h("precision the calibrated threshold targets"))
    copy_calib_rate: float = field(
        default=0.1, metadata=_h("share of samples given a synthetic copy for calibration (copy stage)")
    )
    copy_calib_min: int = field(default=20, metadata=_h("fewest synthetic copies to calibrate on"))
    copy_fallback: float = field(
        default=0.8, metadata=_h("copy threshold used when too few synthetic copies exist to calibrate")
    )
    near_rule: str = field(
        default="or",
        metadata=_h("near copy = pHash OR descriptor, AND, or one of them", choices=list(NEAR_RULES)),
    )

    def validate(self) -> None:
        _check_numbers(self, "dedup.")
        if self.keep not in KEEP:
            raise ConfigError(f"dedup.keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if not 0 <= self.phash_radius <= 64:
            raise ConfigError(f"dedup.phash_radius must be in [0, 64], got {self.phash_radius}")
        if self.near_rule not in NEAR_RULES:
            raise ConfigError(
                f"dedup.near_rule must be one of {', '.join(NEAR_RULES)}, got {self.near_rule!r}"
            )
        for name in ("copy_precision", "copy_calib_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"dedup.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.copy_calib_min < 1:
            raise ConfigError(f"dedup.copy_calib_min must be >= 1, got {self.copy_calib_min}")
        if not 1.0 <= self.copy_lowpass <= 16.0:  # past 16x a 224 px image is 14 px: nothing left to match
            raise ConfigError(f"dedup.copy_lowpass must be in [1, 16], got {self.copy_lowpass}")
        for name in ("threshold", "eval_threshold", "copy_threshold", "copy_fallback"):
            if getattr(self, name) is None:
                continue
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"dedup.{name} is a cosine in [-1, 1], got {getattr(self, name)}")
        for name in ("phash_k", "k", "nprobe", "exact_search_max", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dedup.{name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"dedup.nlist must be >= 1, got {self.nlist}")


@dataclass
class BalanceConfig:
    """Settings of the ``balance`` stage (MetaCLIP concept balancing)."""

    t: int = field(default=20_000, metadata=_h("MetaCLIP per-concept cap t"))
    concepts: str | None = field(default=None, metadata=_h("concept list file (default: shipped)"))
    unmatched_prob: float = field(default=0.0, metadata=_h("keep probability of captions with no concept"))
    seed: int = field(default=0, metadata=_h("seed of the keep draw"))

    def validate(self) -> None:
        _check_numbers(self, "balance.")
        if self.t < 1:
            raise ConfigError(f"balance.t must be >= 1, got {self.t}")
        if not 0.0 <= self.unmatched_prob <= 1.0:
            raise ConfigError(f"balance.unmatched_prob must be in [0, 1], got {self.unmatched_prob}")


FOLD_RECIPES = ("quickstart", "frozen-linear")
FOLD_CAPTIONS = ("first", "all")


@dataclass
class FoldsConfig:
    """Out-of-fold clip scores (``--folds K --recipe quickstart``, curate/folds.py): K scorers, each
    trained on the other folds, score the fold they never saw (a scorer that trained on a pair has
    memorized it, shuffled or not)."""

    k: int = field(
        default=0, metadata=_h("folds (0: off; >= 2: out-of-fold clip_score from K trained scorers)")
    )
    recipe: str = field(
        default="quickstart",
        metadata=_h(
            "recipe the fold scorers train with (clipforge quickstart's)", choices=list(FOLD_RECIPES)
        ),
    )
    epochs: float | None = field(default=None, metadata=_h("fold scorer epochs (default: the recipe's)"))
    batch_size: int | None = field(default=None, metadata=_h("fold scorer batch (default: the recipe's)"))
    seed: int = field(default=0, metadata=_h("salt of the key hash that assigns folds, and training seed"))
    cache_dir: str | None = field(
        default=None,
        metadata=_h("locked-tower feature cache of the fold shards (default OUT/folds/feature_cache)"),
    )
    model: str | None = field(
        default=None, metadata=_h("scorer model spec (default: the recipe's towers and options)")
    )
    model_opts: dict[str, Any] = field(
        default_factory=dict, metadata=_h("options of --folds.model (the recipe's when no model is given)")
    )
    captions: str = field(
        default="first",
        metadata=_h(
            "score a pair by its KEY.txt caption (first) or by the mean cosine over all its captions (all: "
            "KEY.txt + KEY.json, what the trainer reads; locked towers only)",
            choices=list(FOLD_CAPTIONS),
        ),
    )
    rounds: int = field(
        default=1,
        metadata=_h(
            "out-of-fold rounds (1-3): in round r+1 scorer i retrains on the other folds' pairs whose "
            "round-r score clears the no-label mixture cut (clip_score > auto), then rescores fold i"
        ),
    )

    def validate(self) -> None:
        _check_numbers(self, "folds.")
        if not 1 <= self.rounds <= 3:
            raise ConfigError(f"folds.rounds must be in 1..3, got {self.rounds}")
        if self.captions not in FOLD_CAPTIONS:
            raise ConfigError(
                f"folds.captions must be one of {', '.join(FOLD_CAPTIONS)}, got {self.captions!r}"
            )
        if self.k == 1 or self.k < 0:
            raise ConfigError(f"folds.k must be 0 (off) or >= 2, got {self.k}")
        if self.recipe not in FOLD_RECIPES:
            raise ConfigError(f"folds.recipe must be one of {', '.join(FOLD_RECIPES)}, got {self.recipe!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"folds.batch_size must be >= 1, got {self.batch_size}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"folds.epochs must be > 0, got {self.epochs}")


@dataclass
class CurateConfig:
    """Knobs of a curation run (written to ``OUT/config.yaml``; a resume must use the same ones)."""

    stages: list[str] = field(
        default_factory=lambda: list(DEFAULT_STAGES),
        metadata=_h("stages: clip-score,text,image,copy,safety,dedup,balance"),
    )
    model: str | None = field(default=None, metadata=_h("model spec or saved dir (clip-score, safety)"))
    batch_size: int = field(default=64, metadata=_h("samples per stage call"))
    image_size: int | None = field(default=None, metadata=_h("score at this input size (cheaper on CPU)"))
    draft_size: int | None = field(default=None, metadata=_h("JPEG DCT-domain downscale at decode"))
    lexicon: str | None = field(default=None, metadata=_h("visual noun lexicon file (default: shipped)"))
    safety_prompts: str | None = field(default=None, metadata=_h("safety prompt JSON (default: shipped)"))
    langid_min_chars: int = field(default=1, metadata=_h("shortest caption given a language id"))
    runtime: str = field(
        default="torch", metadata=_h("clip-score model runtime: torch | onnx (the model's onnx export)")
    )
    dedup: DedupConfig = field(default_factory=DedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)

    def validate(self) -> None:
        if not isinstance(self.stages, list) or not all(isinstance(s, str) for s in self.stages):
            raise ConfigError(f"stages must be a list of names, got {self.stages!r}")
        _check_numbers(self, "")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.runtime not in ("torch", "onnx"):
            raise ConfigError(f"runtime must be torch or onnx, got {self.runtime!r}")
        for name in ("image_size", "draft_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurateConfig:
        """Strict: an unknown key (at any depth) raises ConfigError with a did-you-mean."""
        return from_dict(cls, d)
