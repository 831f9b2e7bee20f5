"""Data layer: webdataset shards in and out, decode/preprocess, bad-sample accounting."""

from clipforge.data.dataset import DataPosition, ShardDataset, collate, record_bad
from clipforge.data.decode import DecodeConfig, SkipSample, decode_image, decode_sample, decode_text
from clipforge.data.fetch import FetchError, safe_fetch
from clipforge.data.fields import FieldError, sample_fields
from clipforge.data.reader import ReadLimits, iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import ShardSpecError, expand_shards, open_shard, shards_from_file
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.data.writer import ShardWriter, add_columns, read_side_table

__all__ = [
    "BadSampleReport",
    "DataPosition",
    "DecodeConfig",
    "FetchError",
    "FieldError",
    "ImageTransform",
    "PreprocessConfig",
    "ReadLimits",
    "ShardDataset",
    "ShardSpecError",
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
    "safe_fetch",
    "sample_fields",
    "shards_from_file",
]
