"""Data layer: webdataset shards in and out, decode/preprocess, bad-sample accounting."""

from clipforge.data.dataset import DataPosition, ShardDataset, collate, record_bad
from clipforge.data.decode import DecodeConfig, SkipSample, decode_image, decode_sample, decode_text
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, open_shard
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.data.writer import ShardWriter, add_columns, read_side_table

__all__ = [
    "BadSampleReport",
    "DataPosition",
    "DecodeConfig",
    "ImageTransform",
    "PreprocessConfig",
    "ShardDataset",
    "ShardWriter",
    "SkipSample",
    "add_columns",
    "collate",
    "decode_image",
    "decode_sample",
    "decode_text",
    "expand_shards",
    "iter_tar_samples",
    "open_shard",
    "read_side_table",
    "record_bad",
]
