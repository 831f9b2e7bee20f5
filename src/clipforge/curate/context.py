"""The context both curation engines (local threads, Ray actors) give stages: one module, so neither
engine imports the other."""

from __future__ import annotations

import threading
from typing import Any

from clipforge.curate.clipscore import stage_model
from clipforge.curate.config import CurateConfig
from clipforge.curate.registry import Context


class EngineContext(Context):
    """Context whose lazy caches are built once even when worker threads ask at the same time, and
    whose model runs under ``config.runtime`` (torch, or its onnx export: curate.clipscore.stage_model)."""

    def __init__(self, config: CurateConfig, model: Any = None) -> None:
        super().__init__(config, model)
        self._lock = threading.RLock()
        self._model_ready = False

    @property
    def model(self) -> Any:
        with self._lock:
            if not self._model_ready:
                self._model = stage_model(self.config, self._model)
                self._model_ready = True
            return self._model

    def cached(self, name: str, build: Any) -> Any:
        with self._lock:
            return super().cached(name, build)
