"""Data layer: webdataset shards in and out, decode/preprocess, bad-sample accounting."""

from clipforge.data.dataset import DataPosition, ShardDataset, collate, record_bad
from clipforge.data.decode import DecodeConfig, SkipSample, decode_image, decode_sample, decode_text
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, open_shard
from clipforge.data.transforms import ImageTransform, PreprocessConfig

__all__ = [
    "BadSampleReport",
    "DataPosition",
    "DecodeConfig",
    "ImageTransform",
    "PreprocessConfig",
    "ShardDataset",
    "SkipSample",
    "collate",
    "decode_image",
    "decode_sample",
    "decode_text",
    "expand_shards",
    "open_shard",
    "record_bad",
]
