from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipforge.curate.filter import FilterError, apply_filters, evaluate, parse


@pytest.fixture()
def table():
    return pa.table(
        {
            "key": [f"k{i}" for i in range(10)],
            "clip_score": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, None],
            "caption_words": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            "lang": ["en"] * 8 + ["fr", None],
            "is_duplicate": [False, True] * 5,
        }
    )


def mask(expr, t):
    return evaluate(parse(expr), t).to_numpy(zero_copy_only=False).tolist()


def test_comparisons_and_boolean_logic(table):
    assert sum(mask("clip_score > 0.28 and caption_words >= 3", table)) == 7
    assert mask("clip_score > 0.55 or caption_words < 2", table) == [True] + [False] * 4 + [True] * 4 + [
        False
    ]
    assert sum(mask("not is_duplicate", table)) == 5
    assert sum(mask("lang == 'en' and not (is_duplicate)", table)) == 4
    assert sum(mask("lang in ('fr', 'de')", table)) == 1
    assert mask("clip_score is null", table)[-1] and sum(mask("clip_score is not null", table)) == 9
    assert sum(mask("0.5 <= clip_score", table)) == 5


def test_null_never_passes(table):
    assert not mask("clip_score > -1", table)[-1]
    assert not mask("not clip_score > 5", table)[-1]  # SQL: not(null) is null -> dropped


def test_percentiles_are_over_non_null_values(table):
    top = mask("clip_score top 30%", table)  # 9 scored -> ceil(2.7) = 3 kept
    assert top == [False] * 6 + [True] * 3 + [False]
    bottom = mask("caption_words bottom 20%", table)
    assert bottom == [True, True] + [False] * 8


def test_intersection_counts(table):
    m, counts = apply_filters(table, ["clip_score top 50%", "not is_duplicate"])
    assert [c["kept"] for c in counts] == [5, 5]
    assert m.sum() == int(
        np.sum(
            np.array(mask("clip_score top 50%", table)) & ~np.array(table.column("is_duplicate").to_pylist())
        )
    )


@pytest.mark.parametrize(
    "bad",
    [
        "__import__('os').system('true')",
        "clip_score >",
        "clip_score top 150%",
        "clip_score; 1",
        "nonexistent > 1",
        "caption_words",
        "lang > 0.5",
        "",
        "(clip_score > 1",
        "0.5",
    ],
)
def test_bad_expressions_raise_clear_errors(table, bad):
    with pytest.raises(FilterError):
        evaluate(parse(bad), table)
