"""TrainConfig: every knob of a run in one dataclass, from CLI flags, a dict or a YAML file.

The resolved config is saved as ``config.yaml`` next to the checkpoints so a run can be reproduced
(and ``--resume`` checks it trains the same thing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from clipforge.utils import atomic_path


@dataclass
class TrainConfig:
    model: str = "scratch:vit-tiny"  # spec or saved dir (see clipforge.load_model); "py:mod:fn" for custom
    model_opts: dict[str, Any] = field(default_factory=dict)  # kwargs to load_model (unlock_image=1, ...)
    data: list[str] = field(default_factory=list)  # shard specs (paths, globs, brace ranges, dirs, urls)
    output: str = "runs/train"
    # length: exactly one of steps / epochs
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64  # GLOBAL batch (all ranks, all accumulation micro-batches)
    accum: int = 1  # micro-batches per step (GradCache: the contrastive batch stays batch_size)
    lr: float = 5e-4
    wd: float = 0.1
    warmup: int = 0  # steps
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    loss: str = "clip"  # clip | siglip
    local_loss: bool = True
    multi_positive: int = 0  # >1: that many captions per image in a batch, all positives
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    grad_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False  # FSDP2 under torchrun: shard trainable towers (heads stay replicated); see dist.py
    device: str = "auto"  # auto | cpu | cuda
    # data
    workers: int = 2
    shuffle_buffer: int = 1000
    augment: bool = True  # random-resized-crop for a trained image tower (never for a cached one)
    caption_field: str = "captions"  # captions (all KEY.json captions, one picked per epoch) | caption
    # locked-tower feature cache
    cache: str = "auto"  # auto (cache when the image tower is locked) | off
    cache_dir: str | None = None  # default: OUTPUT/../.feature_cache (shared by runs in one folder)
    cache_batch_size: int = 128
    # checkpoints / logging
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    seed: int = 0
    threads: int | None = None
    tensorboard: bool = True
    progress: bool = True

    @classmethod
    def from_any(cls, cfg: TrainConfig | dict | str | Path) -> TrainConfig:
        if isinstance(cfg, TrainConfig):
            return cfg
        if isinstance(cfg, (str, Path)):
            cfg = yaml.safe_load(Path(cfg).read_text()) or {}
        if not isinstance(cfg, dict):
            raise TypeError(f"TrainConfig.from_any: expected TrainConfig, dict or YAML path, got {type(cfg)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown train config keys: {unknown}")
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be clip or siglip, got {self.loss!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.accum < 1 or self.batch_size < 1:
            raise ValueError("batch_size and accum must be >= 1")
        if self.cache not in ("auto", "off"):
            raise ValueError(f"cache must be auto or off, got {self.cache!r}")
        if not self.data:
            raise ValueError("no training data: give shard specs (data=...)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
