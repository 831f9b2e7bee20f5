"""``clipforge curate`` on hostile input: skip counters seen in text mode, ``--where`` expressions from
users (NaN scores, mistyped values, typos, deep nesting), damaged score runs. Runs are built by hand."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_testutils import CAPTIONS, image_bytes, write_shard

from clipforge.cli import main
from clipforge.curate.filter import FilterError, apply_filters


def make_run(root, scores=None, n=10):
    """Two shards of ``n`` samples (k{s}_{i:02d}) and a score dir (scores.parquet + manifest.json)."""
    urls, keys = [], []
    for s in range(2):
        rows = [
            {"key": f"k{s}_{i:02d}", "jpg": image_bytes(i, size=8), "txt": CAPTIONS[i % len(CAPTIONS)]}
            for i in range(n)
        ]
        urls.append(str(write_shard(root / f"part-{s:06d}.tar", rows)))
        keys += [r["key"] for r in rows]
    if scores is None:
        scores = np.random.default_rng(0).normal(0.3, 0.05, len(keys))
    d = root / "scores"
    d.mkdir()
    table = pa.table(
        {
            "key": keys,
            "shard": [f"part-{int(k[1]):06d}.tar" for k in keys],
            "caption": [CAPTIONS[int(k[-2:]) % len(CAPTIONS)] for k in keys],
            "clip_score": pa.array(scores, pa.float64()),
        }
    )
    pq.write_table(table, d / "scores.parquet")
    (d / "manifest.json").write_text(json.dumps({"urls": urls}))
    return d, urls, keys


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["curate", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- 1: counted skips are printed in text mode, and --json is one object on stdout ---------------


def test_fix_text_output_prints_its_nonzero_skip_counters(tmp_path, capsys):
    scores = [0.05] * 6 + [np.nan] + list(np.linspace(0.28, 0.32, 33))  # NaN: not judged by the auto cut
    d, _, keys = make_run(tmp_path, scores=scores, n=20)
    t = pq.read_table(d / "scores.parquet")
    pq.write_table(t.slice(0, 39), d / "scores.parquet")  # k1_19 in a shard, not in scores: a bad sample
    low = keys[:6]
    side = tmp_path / "side.parquet"
    pq.write_table(
        pa.table(
            {
                "key": [*low, "not-a-key"],
                "caption_synthetic": ["a dog"] * 7,
                "clip_score_synthetic": [np.nan, *[0.5] * 6],  # one failed score: skipped
                "clip_score_original": [0.1] * 7,
            }
        ),
        side,
    )
    argv = ["fix", "--scores", str(d), "--captions", str(side)]
    rc, out, _ = run_cli(capsys, *argv, "--output", str(tmp_path / "o"))
    assert rc == 0
    for line in (
        "kept_unjudged",
        "caption_rows_skipped: non_finite_score",
        "synthetic_captions_unmatched",
        "bad_samples: not_in_scores",
    ):
        assert line in out, (line, out)
    rc, out, _ = run_cli(capsys, *argv, "--output", str(tmp_path / "j"), "--json")
    s = json.loads(out)  # the whole of stdout is one object
    assert rc == 0 and s["caption_rows_skipped"] == {"non_finite_score": 1}
    assert s["bad_samples"] == {"not_in_scores": 1} and s["synthetic_captions_unmatched"] == 1


def test_filter_report_and_threshold_text_output_count_null_drops_and_lost_samples(tmp_path, capsys):
    scores = [np.nan, np.nan] + list(np.linspace(0.1, 0.5, 18))
    d, urls, _ = make_run(tmp_path, scores=scores)
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])  # damaged since scoring: kept keys are lost
    rc, out, _ = run_cli(capsys, "filter", "--scores", str(d), "--where", "not clip_score < 0.2",
                         "--output", str(tmp_path / "f"))  # fmt: skip
    assert rc == 0
    assert "dropped: null/NaN" in out and "not_written" in out and "bad_samples: truncated_shard" in out
    s = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert s["filters"][0]["dropped_null"] == 2 and s["not_written"] > 0
    rc, out, _ = run_cli(capsys, "report", "--scores", str(d), "--where", "clip_score > 0.2",
                         "--output", str(tmp_path / "r"), "--examples", "0")  # fmt: skip
    assert rc == 0 and "dropped: null/NaN" in out
    rc, out, _ = run_cli(capsys, "threshold", "--scores", str(d), "--buckets", "1")
    assert rc == 0 and "skipped_non_finite" in out


# -- 2: --where expressions are untrusted: bounded, typed, NaN-safe, one error line ---------------


@pytest.fixture()
def table() -> pa.Table:
    return pa.table(
        {
            "clip_score": pa.array([0.1, float("nan"), 0.5, None], pa.float64()),
            "n": pa.array([1, 2, 3, 4], pa.int64()),
            "lang": ["en", "de", None, "en"],
            "tag": pa.array(["a", "b", None, "a"]).dictionary_encode(),
            "flag": [True, False, None, True],
        }
    )


def mask(table: pa.Table, expr: str) -> list[bool]:
    return apply_filters(table, [expr])[0].tolist()


def test_nan_is_null_in_every_comparison_and_null_drops_are_counted(table):
    # a failed (NaN) score must not pass through 'not' or '!=' (it did: NaN > t is False, not null)
    assert mask(table, "not clip_score > 0.2") == [True, False, False, False]
    assert mask(table, "clip_score != 0.5") == [True, False, False, False]
    assert mask(table, "not clip_score in (0.5)") == [True, False, False, False]
    assert mask(table, "not lang in ('de')") == [True, False, False, True]  # null in (...) is null
    assert mask(table, "clip_score is null") == [False, True, False, True]
    _, counts = apply_filters(table, ["clip_score > 0.2", "clip_score is null", "flag or clip_score > 1"])
    assert [c["dropped_null"] for c in counts] == [2, 0, 2]  # or: a True side decides


def test_auto_error_names_the_operator_given(table):
    for op in ("<", "<=", ">"):
        with pytest.raises(FilterError, match=f"'clip_score' {op} auto"):
            mask(table, f"clip_score {op} auto")


@pytest.mark.parametrize(
    "expr, match",
    [
        ("cip_score > 0.2", "did you mean 'clip_score'"),
        ("n in ('1')", "'n' is a numeric column"),  # was a silent cast: matched n == 1
        ("n in (true)", "'n' is a numeric column"),  # was a silent cast: matched n == 1
        ("lang in (1)", "'lang' is a text column"),  # was a silent miss: kept nothing
        ("lang > 0.5", "compare it with a quoted string"),
        ("clip_score == true", "compare it with a number"),
        ("flag > 0", "compare it with true/false"),
        ("lang", "compare it with a quoted string"),
        ("(" * 101 + "flag" + ")" * 101, "nested deeper than"),
        ("not " * 101 + "flag", "nested deeper than"),
        (" or ".join(["flag"] * 3000), "characters long"),
    ],
)
def test_bad_where_expressions_are_one_clear_error(table, expr, match):
    with pytest.raises(FilterError, match=match):
        mask(table, expr)


def test_dictionary_columns_compare_like_strings(table):
    assert mask(table, "tag in ('a')") == [True, False, False, True]  # was a raw ArrowTypeError
    assert mask(table, "tag == 'b'") == [False, True, False, False]
    with pytest.raises(FilterError, match="text column"):
        mask(table, "tag in (1)")


def test_cli_where_errors_are_one_line_without_traceback(tmp_path, capsys):
    d, _, _ = make_run(tmp_path)
    for expr in ("clip_scor > 0.2", "caption in (1)", "(" * 200 + "x" + ")" * 200):
        rc, out, err = run_cli(capsys, "filter", "--scores", str(d), "--where", expr,
                               "--output", str(tmp_path / "o"), "--json")  # fmt: skip
        assert rc == 2 and "Traceback" not in err and list(json.loads(out)) == ["error"]
    assert not (tmp_path / "o").exists()  # checked before the output dir is touched


# -- 3: a damaged score run is one error naming the file ----------------------------------------


def _damage(d, how: str) -> str:
    """Break the score run ``d`` one way; returns the file the error must name."""
    s, m = d / "scores.parquet", d / "manifest.json"
    if how == "corrupt parquet":
        s.write_bytes(s.read_bytes()[:-20])
    elif how == "scores is a dir":
        s.unlink()
        s.mkdir()
    elif how == "no key column":
        pq.write_table(pq.read_table(s).drop(["key"]), s)
    elif how == "int keys":
        t = pq.read_table(s)
        pq.write_table(t.set_column(0, "key", pa.array(range(t.num_rows))), s)
    elif how == "no manifest":
        m.unlink()
    elif how == "manifest is a dir":
        m.unlink()
        m.mkdir()
    elif how == "manifest not json":
        m.write_text("{nope")
    elif how == "manifest a list":
        m.write_text("[]")
    elif how == "urls missing":
        m.write_text("{}")
    elif how == "urls a number":
        m.write_text('{"urls": 5}')
    return str(s if "parquet" in how or "scores" in how or "key" in how else m)


@pytest.mark.parametrize(
    "how",
    [
        "corrupt parquet",
        "scores is a dir",
        "no key column",
        "int keys",
        "no manifest",
        "manifest is a dir",
        "manifest not json",
        "manifest a list",
        "urls missing",
        "urls a number",
    ],
)
def test_damaged_score_run_is_one_error_naming_the_file(tmp_path, capsys, how):
    d, _, _ = make_run(tmp_path)
    path = _damage(d, how)
    for cmd in (["filter", "--where", "clip_score > 0"], ["report"]):
        rc, _, err = run_cli(capsys, cmd[0], "--scores", str(d), *cmd[1:], "--output", str(tmp_path / "o"))
        assert rc == 2 and "Traceback" not in err, (how, err)
        assert err.startswith(f"error: {path}") and len(err.strip().splitlines()) == 1, (how, err)


def test_kept_rows_without_a_key_are_skipped_and_counted(tmp_path, capsys):
    d, _, keys = make_run(tmp_path)
    t = pq.read_table(d / "scores.parquet")
    pq.write_table(t.set_column(0, "key", pa.array([None, *keys[1:]], pa.string())), d / "scores.parquet")
    rc, out, _ = run_cli(capsys, "filter", "--scores", str(d), "--where", "clip_score > -1", "--no-reshard",
                         "--output", str(tmp_path / "o"))  # fmt: skip
    assert rc == 0 and "skipped_null_key" in out  # was a TypeError writing keep.txt
    assert (tmp_path / "o" / "keep.txt").read_text().split() == keys[1:]
