"""caption rewrite: the noun filter, the side table (caption run's layout), rejects by reason, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from llm_testutils import FakeLM, caption_shard, tiny_llm

from clipforge.caption.rewrite import check_rewrite, content_nouns, run_rewrites

CAPS = {"k1": "A dog runs across the grass .", "k2": "Two men play ball on a beach .", "k3": "", "k4": None}


def answer(prompt: str) -> list[str]:
    cap = prompt.removeprefix("Caption: ")
    if cap.startswith("A dog"):
        return ["A puppy is running over the green grass.",  # kept: puppy = dog, grass kept
                "A dog is running.",  # drops "grass"
                "A dog runs across the grass.",  # a copy of the caption
                "A puppy is running over the green grass.",  # a duplicate
                "A dog runs across the grass with a ball and a frisbee near a tree."]  # adds nouns  # fmt: skip
    return ["On a beach, two men are playing with a ball.", "Two guys play ball on the beach sand.",
            "Two men are playing ball on a beach by the sea.", "Two men, a ball, a beach.", "x " * 50]  # fmt: skip


def test_noun_check() -> None:
    assert content_nouns("Two young guys look at their hands in the yard .") == {"man", "hand", "yard"}
    nouns = content_nouns("A dog runs across the grass .")
    assert nouns == {"dog", "grass"}
    cap = "A dog runs across the grass ."
    assert check_rewrite(cap, "A dog is running.", nouns, []) == "dropped_noun"
    assert check_rewrite(cap, "A puppy is running over the grass.", nouns, []) is None
    assert check_rewrite(cap, "a dog runs across the grass", nouns, []) == "copy"
    assert check_rewrite(cap, "", nouns, []) == "empty"
    assert check_rewrite(cap, "Rewritten caption of a dog on grass", nouns, []) == "prompt_copy"
    assert check_rewrite(cap, "A dog on grass.", nouns, ["a dog on grass"]) == "duplicate"
    assert check_rewrite(cap, "A dog on grass " + "and more " * 30, nouns, [], max_words=20) == "too_long"
    added = "A dog on the grass with a ball, a frisbee and a tree."
    assert check_rewrite(cap, added, nouns, []) == "added_noun"
    assert check_rewrite(cap, added, nouns, [], max_added_nouns=None) is None
    assert check_rewrite(cap, "A dog is running.", nouns, [], min_noun_recall=0.5) is None


def test_rewrite_table_rejects_and_resume(tmp_path: Path) -> None:
    s1 = caption_shard(tmp_path / "d" / "a-000.tar", CAPS)
    s2 = caption_shard(tmp_path / "d" / "b-000.tar", {"m1": "Two men play ball on a beach ."})
    broken = tmp_path / "d" / "c-000.tar"
    broken.write_bytes(b"not a tar at all" * 10)
    lm = FakeLM(answer)
    cfg = {"data": [str(s1), str(s2), str(broken)], "output": str(tmp_path / "out"), "k": 2, "candidates": 5}
    s = run_rewrites(cfg, progress=False, lm=lm)
    assert lm.calls == 3 and s["shards_done"] == 2 and s["shards_failed"] == 1
    t = pq.read_table(tmp_path / "out" / "captions" / "a-000.parquet").to_pylist()
    assert [r["key"] for r in t] == ["k1", "k2"]  # k3 (empty caption) and k4 (none) are bad samples
    r1 = t[0]
    assert r1["caption_rewrites"] == ["A puppy is running over the green grass."]
    assert (
        r1["reject_dropped_noun"],
        r1["reject_copy"],
        r1["reject_duplicate"],
        r1["reject_added_noun"],
    ) == (1, 1, 1, 1)
    assert len(t[1]["caption_rewrites"]) == 2 and t[1]["reject_surplus"] >= 1  # at most k kept
    bad = s["bad_samples"]
    assert bad["counts"]["empty_caption"] == 1 and bad["counts"]["missing_caption"] == 1
    assert any("a-000.tar:k3" in k for k in bad["keys"]["empty_caption"])
    assert bad["total"] >= 3  # + the broken shard, by name
    assert s["rejects"]["dropped_noun"] >= 1 and s["rewrites_kept"] == 1 + 2 + 2
    again = FakeLM(answer)
    s2r = run_rewrites(cfg, progress=False, lm=again, resume=True)
    assert again.calls == 0 and s2r["shards_skipped_resume"] == 2  # the done shards are skipped
    assert s2r["bad_samples"]["counts"]["empty_caption"] == 1  # and still reported
    with pytest.raises(FileExistsError):
        run_rewrites(cfg, progress=False, lm=again)  # neither --resume nor --overwrite
    with pytest.raises(ValueError, match="k"):
        run_rewrites({**cfg, "k": 3}, progress=False, lm=again, resume=True)  # settings changed


def test_cli_with_a_tiny_llama_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clipforge.cli import main

    llm = tiny_llm(tmp_path / "llm")
    shard = caption_shard(
        tmp_path / "s-000.tar", {"a": "a dog runs on the grass", "b": "two men playing ball"}
    )
    tables = []
    for run in ("r1", "r2"):
        rc = main(["caption", "rewrite", "--data", str(shard), "--output", str(tmp_path / run), "--llm", str(llm),
                   "--k", "2", "--candidates", "3", "--max-new-tokens", "8", "--seed", "3", "--json"])  # fmt: skip
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["captions"] == 2 and out["rewrites_drawn"] == 6
        assert sum(out["rejects"].values()) + out["rewrites_kept"] == 6  # every draw is kept or counted
        tables.append(pq.read_table(tmp_path / run / "captions" / "s-000.parquet").to_pylist())
    assert tables[0] == tables[1]
    assert set(tables[0][0]) >= {
        "key",
        "caption_original",
        "caption_rewrites",
        "n_rewrites",
        "reject_dropped_noun",
    }
