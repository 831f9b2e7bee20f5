from __future__ import annotations

import numpy as np
import pyarrow as pa

from clipforge.curate.balance import BalanceConfig, ConceptMatcher, balance
from clipforge.curate.dedup import DedupConfig, dedup_stage, eval_duplicates, keeper_of, semantic_dedup
from clipforge.curate.stages import Context, CurateConfig


def planted(n=2000, dups=50, dim=32, seed=0, noise=0.02):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n - dups, dups, replace=False)
    x[n - dups :] = x[src] + noise * rng.standard_normal((dups, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, src


def test_keeper_prefers_quality_then_first_row():
    labels = np.array([0, 0, 0, 1, 2, 2])
    q = np.array([0.1, 0.5, 0.5, 0.0, np.nan, 0.2])
    assert keeper_of(labels, q).tolist() == [1, 1, 1, 3, 5, 5]


def test_keeper_ignores_float_noise_between_exact_copies():
    """Two copies scored 0.5 and 0.5 + 5e-6 (float noise of a rerun) keep the earlier row either way;
    a real difference (1e-3) still decides."""
    labels = np.array([0, 0, 1, 1])
    assert keeper_of(labels, np.array([0.5, 0.5 + 5e-6, 0.3, 0.3 + 1e-3])).tolist() == [0, 0, 3, 3]
    assert keeper_of(labels, np.array([0.5 + 5e-6, 0.5, 0.3 + 1e-3, 0.3])).tolist() == [0, 0, 2, 2]


def test_semantic_dedup_finds_planted_pairs_exact_and_ivf():
    x, src = planted()
    keys = [f"k{i}" for i in range(len(x))]
    for cfg in (
        DedupConfig(threshold=0.95),
        DedupConfig(threshold=0.95, exact_search_max=100, nlist=20, nprobe=4),
    ):
        out = semantic_dedup(keys, x.astype(np.float16), None, cfg)
        flagged = {i for i, d in enumerate(out["semantic_dup_of"]) if d is not None}
        pairs = list(zip(src, range(len(x) - 50, len(x))))
        found = sum((a in flagged) != (b in flagged) for a, b in pairs)  # exactly one of each pair dropped
        assert found >= 49
        assert len(flagged) <= 52  # random unit vectors in 32-d are never 0.95-similar


def test_dedup_stage_union_keeps_one_per_group():
    # rows 0,1 exact dup; 1,2 semantic dup; 3 alone. One keeper for {0,1,2} even if types disagree.
    e = np.eye(4, dtype=np.float32)
    e[2] = e[1] * 0.99 + 0.01
    table = pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "sha256": ["x", "x", "y", "z"],
            "phash": [1, 1 << 40, 7 << 20, 0x0F0F0F0F0F0F0F0F],
            "caption": ["A dog.", "a dog", "cat", None],
            "clip_score": [0.1, 0.2, 0.3, 0.4],
        }
    )
    ctx = Context(CurateConfig())
    out = dedup_stage(table, {"image": e}, ctx)
    assert out["is_duplicate"] == [True, True, False, False]
    assert out["dup_of"][:2] == ["c", "c"]
    assert out["exact_dup_of"] == ["b", None, None, None]
    assert out["caption_dup_count"] == [2, 2, 1, 0]


def test_eval_duplicates_by_embedding_and_phash():
    train = np.eye(3, dtype=np.float32)
    ev = np.array([[1, 0, 0], [0, 0.6, 0.8]], dtype=np.float32)
    out = eval_duplicates(
        train, [5, 0x7FFFFFFFFFFF0000, 99], ["e0", "e1"], ev, [1 << 60, 99 ^ 1], DedupConfig()
    )
    assert out["eval_dup_of"] == ["e0", None, "e1"]  # row 2 via pHash distance 1
    assert abs(out["eval_sim"][0] - 1.0) < 1e-5 and out["eval_phash_dist"][2] == 1


def test_concept_matcher_whole_words_and_ngrams():
    m = ConceptMatcher(["dog", "hot dog", "cat"])
    assert m("A hot dog stand") == ["dog", "hot dog"]
    assert m("dogma and concatenation") == []


def test_balance_caps_head_concepts_and_keeps_tail():
    caps = ["a dog"] * 1000 + ["a cat"] * 20 + ["nothing here"] * 5
    keys = [f"k{i}" for i in range(len(caps))]
    out = balance(keys, caps, ["dog", "cat"], BalanceConfig(t=100, seed=1))
    st = out["__stats__"]
    assert st["before"] == {"dog": 1000, "cat": 20}
    assert 70 <= st["after"]["dog"] <= 130 and st["after"]["cat"] == 20
    assert st["unmatched"] == 5 and not any(out["balance_keep"][-5:])
    again = balance(keys, caps, ["dog", "cat"], BalanceConfig(t=100, seed=1))
    assert again["balance_keep"] == out["balance_keep"]
