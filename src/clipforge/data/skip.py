"""The one exception that means "skip this sample and record why" (raised by decode, fetch, fields...)."""

from __future__ import annotations


class SkipSample(Exception):
    """Raised by decode/map functions: the sample is skipped and recorded under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
