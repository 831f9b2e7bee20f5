"""The model's plain data types: :class:`ModelConfig` (what rebuilds a model) and ``Features``.

In their own module, importing nothing else from ``clipforge.models``, so the interface (base.py),
persistence (io.py), the backend table (registry.py) and the backends all depend on it and never on
each other in a circle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.data.transforms import PreprocessConfig

Features = dict[str, torch.Tensor]
CONFIG = "config.json"
SAVED_ONLY_KEYS = ("weights",)  # written beside the config by save_model, not config fields


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (weights come from model.safetensors beside it)."""

    backend: str  # a key of clipforge.models.registry.BACKENDS: "towers" | "hf" | "scratch"
    spec: str  # the spec string it was created from, e.g. "towers:efficientnet-lite0+minilm-l6"
    embed_dim: int = 512
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # SigLIP: -10
    preprocess: dict = field(default_factory=lambda: PreprocessConfig().to_dict())
    context_length: int = 77
    options: dict = field(default_factory=dict)  # backend-specific (tower names, head type, unlock, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Strict: an unknown key is an error with a did-you-mean (clipforge.config's one rule)."""
        from clipforge.config import from_dict

        return from_dict(cls, d)


def read_config(directory: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a saved model dir (``config.json``; save-time keys set aside)."""
    raw = json.loads((Path(directory) / CONFIG).read_text())
    return ModelConfig.from_dict({k: v for k, v in raw.items() if k not in SAVED_ONLY_KEYS})
