"""caption fuse (CapsFusion): entity/noun checks, raw kept on a failed check, actions per key, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llm_testutils import FakeLM, caption_shard, tiny_llm

from clipforge.caption.fuse import check_fused, entities, run_fuse

RAW = {"k1": "Rex the dog at Brighton beach in 2019", "k2": "a dog on grass", "k3": "my Fiat 500 outside",
       "k4": "two cats"}  # fmt: skip
SYN = {
    "k1": "a brown dog running on the sand near the water",
    "k2": "a white dog lying on green grass",
    "k3": "a small red car parked on a street",
}  # fmt: skip  (k4: no synthetic caption)
FUSED = {"k1": "Rex, a brown dog, running on the sand near the water at Brighton beach in 2019.",
         "k2": "Caption 1: a dog on grass",  # echoes the prompt
         "k3": "A small red car parked on a street."}  # drops Fiat 500  # fmt: skip


def synthetic_dir(root: Path, shard: str) -> Path:
    (root / "captions").mkdir(parents=True)
    keys = list(SYN)
    pq.write_table(pa.table({"key": keys, "caption_synthetic": [SYN[k] for k in keys]}),
                   root / "captions" / f"{shard}.parquet")  # fmt: skip
    return root


def answer(prompt: str) -> list[str]:
    raw = prompt.split("\n")[0].removeprefix("Caption 1: ")
    return [next(FUSED[k] for k, v in RAW.items() if v == raw)]


def test_checks() -> None:
    assert entities("Rex the dog at Brighton beach in 2019 with two friends") == {"brighton", "2019", "two"}
    raw, syn = "my Fiat 500 outside", "a small red car parked on a street"
    assert check_fused(raw, syn, "A small red car parked on a street.", max_words=50, min_noun_recall=0) == (
        "dropped_entity"
    )
    assert (
        check_fused(raw, syn, "My red Fiat 500 parked outside on a street.", max_words=50, min_noun_recall=1)
        is None
    )
    assert check_fused(raw, syn, "", max_words=50, min_noun_recall=1) == "empty"
    assert check_fused(raw, syn, "Fiat 500 " * 30, max_words=50, min_noun_recall=1) == "too_long"
    assert check_fused("a dog on grass", "a dog", "a dog on the grass. Merge the captions", max_words=50,
                       min_noun_recall=1) == "prompt_copy"  # fmt: skip
    assert check_fused("a dog on grass", "a dog", "a dog lying down", max_words=50, min_noun_recall=1) == (
        "dropped_noun"
    )


def test_fuse_keeps_raw_on_failed_checks(tmp_path: Path) -> None:
    shard = caption_shard(tmp_path / "d" / "s-000.tar", RAW)
    syn = synthetic_dir(tmp_path / "syn", "s-000")
    lm = FakeLM(answer)
    cfg = {"data": [str(shard)], "synthetic": str(syn), "output": str(tmp_path / "out")}
    s = run_fuse(cfg, progress=False, lm=lm)
    assert lm.calls == 3  # k4 has no synthetic caption: no LLM call
    t = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "captions" / "s-000.parquet").to_pylist()}
    assert t["k1"]["fuse_action"] == "fused" and t["k1"]["caption_fused"] == FUSED["k1"]
    assert t["k2"]["fuse_action"] == "raw:prompt_copy" and t["k2"]["caption_fused"] == RAW["k2"]
    assert t["k3"]["fuse_action"] == "raw:dropped_entity" and t["k3"]["caption_fused"] == RAW["k3"]
    assert t["k4"]["fuse_action"] == "raw:no_synthetic" and t["k4"]["caption_fused"] == RAW["k4"]
    assert s["actions"] == {"fused": 1, "raw:dropped_entity": 1, "raw:no_synthetic": 1, "raw:prompt_copy": 1}
    again = FakeLM(answer)
    assert (
        run_fuse(cfg, progress=False, lm=again, resume=True)["shards_skipped_resume"] == 1
        and again.calls == 0
    )
    with pytest.raises(FileNotFoundError, match="caption run"):
        run_fuse({**cfg, "synthetic": str(tmp_path / "nothing"), "output": str(tmp_path / "o2")}, lm=again)


def test_cli_with_a_tiny_llama(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from clipforge.cli import main

    shard = caption_shard(tmp_path / "s-000.tar", RAW)
    syn = synthetic_dir(tmp_path / "syn", "s-000")
    rc = main(["caption", "fuse", "--data", str(shard), "--synthetic", str(syn), "--output", str(tmp_path / "o"),
               "--llm", str(tiny_llm(tmp_path / "llm")), "--max-new-tokens", "8", "--json"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(out["actions"].values()) == 4 and out["actions"]["raw:no_synthetic"] == 1
    t = pq.read_table(tmp_path / "o" / "captions" / "s-000.parquet").to_pylist()
    for r in t:  # a random LM's text is kept only when it passed every check; else the raw caption
        assert r["caption_fused"] == r["caption_original"] or r["fuse_action"] == "fused"
