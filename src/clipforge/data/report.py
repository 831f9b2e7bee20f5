"""Bad-sample accounting: every skipped sample is recorded with its key and reason, never dropped silently."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BadSampleReport:
    """Thread-safe counter of skipped samples: ``reason -> count`` plus the first keys per reason."""

    max_keys_per_reason: int = 1000
    counts: Counter = field(default_factory=Counter)
    keys: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self.counts[reason] += 1
            lst = self.keys.setdefault(reason, [])
            if len(lst) < self.max_keys_per_reason:
                lst.append(f"{key}: {detail}" if detail else key)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a DataLoader worker started by forkserver or spawn gets a copy): no lock inside."""
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadSampleReport | dict[str, Any]) -> None:
        d = other.to_dict() if isinstance(other, BadSampleReport) else other
        for reason, n in d.get("counts", {}).items():
            with self._lock:
                self.counts[reason] += n
                lst = self.keys.setdefault(reason, [])
                room = self.max_keys_per_reason - len(lst)
                lst.extend(d.get("keys", {}).get(reason, [])[: max(room, 0)])

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self.total,
                "counts": dict(self.counts),
                "keys": {k: list(v) for k, v in self.keys.items()},
            }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def summary(self) -> str:
        if not self.counts:
            return "no bad samples"
        return ", ".join(f"{r}={n}" for r, n in self.counts.most_common())
