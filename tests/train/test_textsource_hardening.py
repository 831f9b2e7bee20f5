"""Text sources on hostile side tables: wrong types, duplicates, huge or broken values, corrupt files.

Each is a clear ConfigError naming the file and column, or a value left out and counted by reason and
key in the report; never a crash mid-run, never a silent change of what a sample trains on."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_model import make_tiny

from clipforge.config import ConfigError, from_dict
from clipforge.data.decode import DecodeConfig
from clipforge.data.reader import iter_tar_samples
from clipforge.data.shards import shard_name
from clipforge.train.config import TrainConfig
from clipforge.train.loop import fit
from clipforge.train.textsource import SideTexts, TextChooser, TextSource

MAX_TEXT_CHARS = DecodeConfig().max_caption_chars  # side texts get the shards' caption limit


def load(tmp_path: Path, *tables: pa.Table, mode: str = "synthetic", weight: str | None = None) -> SideTexts:
    paths = []
    for i, t in enumerate(tables):
        paths.append(str(tmp_path / f"t{i}.parquet"))
        pq.write_table(t, paths[-1])
    return SideTexts.load(paths, TextSource.parse(mode), "caption_synthetic", "caption_rewrites", weight)


def test_duplicate_keys_with_different_values_are_counted_first_kept(tmp_path):
    side = load(
        tmp_path,
        pa.table({"key": ["a", "a", "b", "b"], "caption_synthetic": ["first", "second", "same", "same"]}),
        pa.table({"key": ["a"], "caption_synthetic": ["third"]}),
    )
    assert side.get("a") == {"synthetic": "first"}  # the first row, whatever follows
    assert side.get("b") == {"synthetic": "same"}
    assert side.bad == {"conflict_synthetic": ["a", "a"]}  # an identical repeat is no conflict
    rep = side.coverage([("", "a"), ("", "b")], TextSource("synthetic"))
    assert rep["refused_values"] == {"conflict_synthetic": 2} and rep["refused_keys"][
        "conflict_synthetic"
    ] == [
        "a",
        "a",
    ]


@pytest.mark.parametrize(
    "cols,mode,weight,column",
    [
        ({"key": ["a"], "caption_synthetic": [3]}, "synthetic", None, "caption_synthetic"),
        ({"key": ["a"], "caption_synthetic": [["x"]]}, "synthetic", None, "caption_synthetic"),
        ({"key": ["a"], "caption_rewrites": ["just one string"]}, "rewrites:2", None, "caption_rewrites"),
        ({"key": ["a"], "caption_rewrites": [[1, 2]]}, "rewrites:2", None, "caption_rewrites"),
        ({"key": ["a"], "w": ["0.5"]}, "raw", "w", "w"),
        ({"key": ["a"], "w": [True]}, "raw", "w", "w"),
        ({"key": [7], "caption_synthetic": ["x"]}, "synthetic", None, "key"),
        ({"key": ["a"], "shard": [3], "caption_synthetic": ["x"]}, "synthetic", None, "shard"),
    ],
)
def test_wrong_column_type_is_a_config_error_naming_file_and_column(tmp_path, cols, mode, weight, column):
    with pytest.raises(ConfigError, match=rf"t0\.parquet column '{column}' .* holds"):
        load(tmp_path, pa.table(cols), mode=mode, weight=weight)


def test_column_named_twice_is_a_config_error(tmp_path):
    names = ["key", "caption_synthetic", "caption_synthetic"]
    t = pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], names)
    with pytest.raises(ConfigError, match="t0.parquet has more than one column 'caption_synthetic'"):
        load(tmp_path, t)


def test_accepted_column_shapes(tmp_path):
    """Categorical, all-null, decimal and empty columns are fine: usable values kept, the rest missing."""
    side = load(
        tmp_path,
        pa.table(
            {
                "key": pa.array(["a", "b"]).dictionary_encode(),
                "caption_synthetic": pa.array(["cat a", "cat b"]).dictionary_encode(),
                "w": pa.array([Decimal("0.25"), None], pa.decimal128(4, 2)),
            }
        ),
        pa.table(
            {"key": ["c"], "caption_synthetic": pa.array([None], pa.null()), "w": pa.array([None], pa.null())}
        ),
        pa.table({"key": pa.array([], pa.string()), "caption_synthetic": pa.array([], pa.string())}),
        weight="w",
    )
    assert side.get("a") == {"synthetic": "cat a", "weight": 0.25}
    assert side.get("b") == {"synthetic": "cat b"} and side.get("c") == {} and side.bad == {}
    assert TextChooser(TextSource("synthetic"), side, 1, 0).weight("b") == 1.0  # no weight: 1


def test_corrupt_data_pages_are_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "key": [f"k{i}" for i in range(500)],
                "caption_synthetic": [f"caption {i} " * 4 for i in range(500)],
            }
        ),
        str(path),
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # the footer (schema) stays readable
    path.write_bytes(bytes(data))
    assert pq.read_schema(str(path)).names == ["key", "caption_synthetic"]
    with pytest.raises(ConfigError, match=r"cannot read .*t\.parquet"):
        SideTexts.load([str(path)], TextSource("synthetic"), "caption_synthetic", "r", None)
    path.write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(ConfigError, match=r"cannot read .*t\.parquet"):
        SideTexts.load([str(path)], TextSource("synthetic"), "caption_synthetic", "r", None)


def test_huge_texts_are_refused_and_counted(tmp_path):
    huge = "a huge caption. " * 70_000  # ~1 MB
    ok = "x" * MAX_TEXT_CHARS
    side = load(
        tmp_path,
        pa.table(
            {
                "key": ["big", "ok", "rw"],
                "caption_synthetic": [huge, ok, None],
                "caption_rewrites": [None, None, ["fine rewrite", huge]],
            }
        ),
        mode="multi",
    )
    assert side.get("big") == {} and side.get("ok") == {"synthetic": ok}
    assert side.get("rw") == {"rewrites": ["fine rewrite"]}
    assert side.bad == {"too_long_synthetic": ["big"], "too_long_rewrites": ["rw"]}
    pool = TextChooser(TextSource("multi"), side, 2, 0).pool(["raw"], "big", "")
    assert pool == ["raw"]  # no 1 MB text (nor its thousands of sentences) reaches the text tower


def test_rewrites_with_null_blank_and_repeated_entries(tmp_path):
    side = load(
        tmp_path,
        pa.table(
            {
                "key": ["a", "b", "c"],
                "caption_rewrites": pa.array(
                    [[None, "r0", "  ", "r1"], ["r0", "r0", "r1"], []], pa.list_(pa.string())
                ),
            }
        ),
        mode="rewrites:2",
    )
    assert side.get("a") == {"rewrites": ["r0", "r1"]} and side.get("b") == {"rewrites": ["r0", "r1"]}
    assert side.get("c") == {}  # an empty list: no rewrites (missing, not refused)
    assert side.bad == {"bad_rewrites": ["a"]}  # the null and the blank entry are counted
    ch = TextChooser(TextSource("rewrites", k=2), side, 1, seed=0)
    picks = [ch.choose(["orig"], ["orig"], "b", "", e)[0] for e in range(1500)]
    assert {p: picks.count(p) > 400 for p in ("orig", "r0", "r1")} == {"orig": True, "r0": True, "r1": True}


def test_weights_must_be_finite_non_negative_and_bounded(tmp_path):
    vals = [0.5, float("nan"), float("inf"), -1.0, None, 1e300, 1e7, 1e6, 0.0, 3]
    keys = [f"k{i}" for i in range(len(vals))]
    side = load(tmp_path, pa.table({"key": keys, "w": pa.array(vals, pa.float64())}), mode="raw", weight="w")
    ch = TextChooser(TextSource("raw"), side, 1, 0)
    got = [ch.weight(k) for k in keys]
    assert got == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e6, 0.0, 3.0]  # refused or missing: 1
    assert side.bad == {"bad_weight": ["k1", "k2", "k3", "k5", "k6"]}  # the null one is missing, not bad
    assert all(math.isfinite(w) for w in torch.tensor(got, dtype=torch.float32).tolist())


def test_spec_parsing_refuses_odd_numbers_with_a_config_error():
    for spec in (
        "rewrites:²",
        "rewrites:0",
        "rewrites:-1",
        "rewrites:1.5",
        "rewrites:",
        "mix:nan",
        "mix:inf",
        "mix:-0.1",
        "mix:1.01",
        "mix:",
        "mix:half",
        "raw:1",
    ):
        with pytest.raises(ConfigError, match="text_source"):
            TextSource.parse(spec)
    assert TextSource.parse(" mix:1 ") == TextSource("mix", p=1.0)


def test_multi_synthetic_equal_to_raw_is_not_a_second_positive():
    side = SideTexts(
        {"a": {"": {"synthetic": "a dog"}}}, {"synthetic": "s", "rewrites": None, "weight": None}, {}
    )
    ch = TextChooser(TextSource("multi"), side, k=2, seed=0)
    assert ch.choose(["a dog"], ["a dog", "a cat"], "a", "", 0) == ["a dog", "a cat"]
    # only one distinct text: it is repeated (both are the same image's positives, as the loss groups them)
    assert ch.choose(["a dog"], ["a dog", "a dog"], "a", "", 0) == ["a dog", "a dog"]


def test_coverage_counts_unused_table_keys_by_key(tmp_path):
    side = load(
        tmp_path, pa.table({"key": ["in-shards", "refused", "orphan"], "caption_synthetic": ["x", " ", "y"]})
    )
    rep = side.coverage(
        [("s.tar", "in-shards"), ("s.tar", "refused"), ("s.tar", "no-row")], TextSource("synthetic")
    )
    assert rep["missing"] == {"synthetic": 2} and rep["missing_keys"]["synthetic"] == ["refused", "no-row"]
    assert rep["table_keys_unused"] == 1 and rep["unused_keys"] == ["orphan"]  # "refused" is in the shards
    assert rep["refused_keys"] == {"bad_synthetic": ["refused"]}


def test_training_on_a_hostile_table_runs_and_reports(flickr_slice, tmp_path):
    """Cached training (locked towers) with duplicates, a huge caption, a huge weight and unicode: the run
    finishes with a finite loss, each refused value in text_source.json."""
    pairs = [(shard_name(u), s["__key__"]) for u in flickr_slice for s in iter_tar_samples(u)]
    keys = [k for _, k in pairs]
    caps = [f"synthétique ✓ {k}\u2028line two" for k in keys]
    caps[0], caps[1] = "x" * (MAX_TEXT_CHARS + 1), "\x00"
    table = pa.table(
        {
            "key": keys + [keys[2], "not-in-any-shard"],
            "caption_synthetic": caps + ["other", "y"],
            "w": [1.0] * len(keys) + [1.0, 1.0],
        }
    )
    weights = [1e300] + [0.5] * (len(keys) - 1)
    pq.write_table(table, str(tmp_path / "side.parquet"))
    pq.write_table(pa.table({"key": keys, "agree": weights}), str(tmp_path / "w.parquet"))
    cfg = from_dict(
        TrainConfig,
        dict(
            output=str(tmp_path / "run"),
            steps=2,
            batch_size=16,
            workers=0,
            threads=1,
            progress=False,
            tensorboard=False,
            data=flickr_slice,
            text_source="mix:0.5",
            weight_column="agree",
            text_tables=[str(tmp_path / "side.parquet"), str(tmp_path / "w.parquet")],
        ),
    )
    res = fit(make_tiny(lock_image=1, lock_text=1), flickr_slice, cfg).train_result
    assert math.isfinite(res["final_loss"])
    rep = res["text_source"]
    assert rep["refused_keys"] == {
        "too_long_synthetic": [keys[0]],
        "conflict_synthetic": [keys[2]],
        "bad_weight": [keys[0]],
    }
    assert "not-in-any-shard" in rep["unused_keys"]  # (with the corrupt image's key: not in the cache)
    assert rep["with"]["synthetic"] == rep["samples"] - 1
