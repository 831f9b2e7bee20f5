"""``clipforge eval captioning`` and ``eval run --captioner``: flags reach evaluate_captioning, the
result file has the eval layout (``eval compare`` works on it), --json prints one object."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from evalutils import TinyClip

from clipforge.cli import main

CALLS: list[dict] = []


def _fake_eval(captioner, data, **kw):
    CALLS.append({"captioner": captioner, "data": data, **kw})
    bleu = 0.2 if str(captioner).endswith("a") else 0.3
    shards = {"sha256": "0" * 64, "method": "names+sizes", "files": []}
    row = {"dataset": "test-000000.tar", "shards": shards, "scoring_model": kw.get("scoring_model") or "enc",
           "scoring_model_is_encoder": kw.get("scoring_model") is None, "n_images": 3}  # fmt: skip
    return {
        "model": {"captioner": str(captioner), "mode": "paired", "encoder": {"model": "enc"}},
        "results": [
            {"task": "captioning", "metrics": {"bleu4": bleu, "cider_d": 0.5, "n_images": 3}, **row},
            {"task": "captioning/constant", "metrics": {"bleu4": 0.05, "cider_d": 0.1}, **row},
        ],
        "samples": [{"key": "k", "caption": "a dog", "references": ["a dog runs"]}],
        "bad_samples": {"total": 0},
        "seconds": 0.1,
    }


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    import clipforge.caption.evaluate
    import clipforge.models

    CALLS.clear()
    monkeypatch.setattr(clipforge.caption.evaluate, "evaluate_captioning", _fake_eval)
    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: TinyClip(seed=0).eval())
    return CALLS


def test_captioning_flags_results_and_compare(fake, tmp_path: Path, capsys) -> None:
    common = ["--data", "x.tar", "--decode.method", "greedy", "--limit", "3", "--json"]
    assert main(["eval", "captioning", "--captioner", "cap_a", "--output", str(tmp_path / "a"), *common]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert fake[0]["decode"].method == "greedy" and fake[0]["limit"] == 3 and fake[0]["data"] == ["x.tar"]
    assert out["results"][0]["metrics"]["bleu4"] == 0.2
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["clipforge_eval"] == 1 and saved["model"]["spec"] == "captioner:cap_a"
    assert main(["eval", "captioning", "--captioner", "cap_b", "--output", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()
    a, b = str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")
    assert main(["eval", "compare", a, b, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    row = next(r for r in rows if r["task"] == "captioning" and r["metric"] == "bleu4")
    assert row["delta"] == pytest.approx(0.1)
    assert any(r["task"] == "captioning/constant" for r in rows)

    assert main(["eval", "captioning", "--captioner", "cap_a", "--data", "x.tar", "--output",
                 str(tmp_path / "c")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "captioning/constant" in text and "bleu4" in text and "own encoder" in text


def test_captioning_needs_a_captioner(fake, tmp_path: Path, capsys) -> None:
    assert main(["eval", "captioning", "--data", "x.tar", "--output", str(tmp_path), "--json"]) == 2
    assert "--captioner" in json.loads(capsys.readouterr().out)["error"]


def test_run_with_captioner(fake, color_shards, tmp_path: Path, capsys) -> None:
    shards, _ = color_shards
    root = tmp_path / "data"
    (root / "flickr8k").mkdir(parents=True)
    shutil.copy(shards[0], root / "flickr8k" / "test-000000.tar")
    argv = ["eval", "run", "--model", "t0", "--datasets", "flickr8k", "--data-root", str(root), "--workers", "0",
            "--output", str(tmp_path / "out"), "--captioner", "cap_a", "--caption-limit", "2"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "retrieval" in text and "captioning" in text and "cider_d" in text
    assert fake[0]["scoring_model"] == "t0" and fake[0]["limit"] == 2  # scored by the evaluated model
    assert fake[0]["data"] == [str(root / "flickr8k" / "test-000000.tar")]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in saved["results"]] == ["retrieval", "captioning", "captioning/constant"]


@pytest.mark.parametrize("cmd", ["captioning", "compositionality", "robustness", "run"])
def test_help_renders(cmd: str, capsys) -> None:
    """Every generated flag's help must format (a bare '%' in a help string breaks argparse)."""
    with pytest.raises(SystemExit) as e:
        main(["eval", cmd, "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
