"""CuPL descriptions: filtered LLM answers, cached next to the results, ensembled with the templates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "caption"))  # the tiny LLM of the caption tests
from llm_testutils import FakeLM, tiny_llm  # noqa: E402

from clipforge.evaluate.cupl import PROMPTS, cached_descriptions, generate_descriptions  # noqa: E402


def answer(prompt: str) -> list[str]:
    if "red" in prompt:
        return ["A red thing is bright like a fire truck.", "It is shiny.", "A red apple is red.", "red"]
    if "green" in prompt:
        return ["Leaves and grass look like this colour."]  # never names the class
    return ["A blue sky over the sea is blue."]


def test_generate_filters_and_falls_back() -> None:
    lm = FakeLM(answer)
    desc, stats = generate_descriptions(lm, ["red", "green", "blue"], per_prompt=4)
    assert lm.calls == 3 * len(PROMPTS)
    assert desc["red"] == ["A red thing is bright like a fire truck.", "A red apple is red."]  # deduplicated
    assert desc["green"] == ["a photo of a green."] and stats["fallback_classes"] == ["green"]
    assert desc["blue"] == ["A blue sky over the sea is blue."]
    assert stats["rejected"]["no_class_name"] == len(PROMPTS) * 2  # "It is shiny." x3, the green ones x3
    assert (
        stats["rejected"]["empty"] == len(PROMPTS)
        and stats["rejected"]["duplicate"] == 4 + 2  # red: 2 x 2, blue: 2
    )


def test_cache_is_reused_until_the_settings_change(tmp_path: Path) -> None:
    lm = FakeLM(answer)
    path = cached_descriptions(tmp_path / "d.json", ["red", "blue"], "fake", lm=lm)
    assert json.loads(path.read_text())["blue"] == ["A blue sky over the sea is blue."]
    calls = lm.calls
    cached_descriptions(tmp_path / "d.json", ["red", "blue"], "fake", lm=lm)
    assert lm.calls == calls  # reused
    cached_descriptions(tmp_path / "d.json", ["red", "blue"], "fake", lm=lm, seed=1)
    assert lm.calls == 2 * calls  # another seed: written again
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert meta["seed"] == 1 and meta["llm"] == "fake"


def test_eval_generates_and_reports_templates_alone(proto_model, color_shards, tmp_path: Path) -> None:
    from clipforge.evaluate.recipes import DatasetSpec
    from clipforge.evaluate.runner import evaluate

    shards, cn = color_shards
    spec = DatasetSpec(
        name="colors", shards=[str(s) for s in shards], classnames=str(cn), tasks=("zeroshot",)
    )
    cfg = {"descriptions": "generate", "output": str(tmp_path / "out"), "workers": 0, "progress": False,
           "templates": "simple"}  # fmt: skip
    with pytest.raises(ValueError, match="needs --llm"):
        evaluate(proto_model, [spec], cfg)
    llm = tiny_llm(tmp_path / "llm")
    r = evaluate(proto_model, [spec], {**cfg, "llm": str(llm)})["results"][0]
    path = tmp_path / "out" / "descriptions_colors.json"
    assert r["descriptions"] == str(path) and path.exists()
    assert set(json.loads(path.read_text())) == {"red", "green", "blue"}
    assert r["templates_only"]["top1"] == 1.0  # the prototype model, templates alone: perfect
    assert 0.0 <= r["metrics"]["top1"] <= 1.0
