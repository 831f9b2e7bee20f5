"""Data layer: webdataset shards in and out, decode/preprocess, bad-sample accounting.

Exports resolve lazily (PEP 562), so ``clipforge data ingest|inspect`` and the fetch/shard helpers do
not pay for importing torch; only ``ShardDataset``/``collate``/``DataPosition`` need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BadSampleReport": "report",
    "DataPosition": "dataset",
    "DecodeConfig": "decode",
    "FetchError": "fetch",
    "FieldError": "fields",
    "ImageTransform": "transforms",
    "PreprocessConfig": "transforms",
    "ReadLimits": "reader",
    "ShardDataset": "dataset",
    "ShardSpecError": "shards",
    "ShardWriter": "writer",
    "SkipSample": "decode",
    "add_columns": "writer",
    "collate": "dataset",
    "decode_image": "decode",
    "decode_sample": "decode",
    "decode_text": "decode",
    "expand_shards": "shards",
    "iter_tar_samples": "reader",
    "open_shard": "shards",
    "read_side_table": "writer",
    "record_bad": "dataset",
    "safe_fetch": "fetch",
    "sample_fields": "fields",
    "shards_from_file": "shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"clipforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'clipforge.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
