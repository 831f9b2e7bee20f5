"""The LLM extra's loader and generator: spec resolution, batched prefix-cached decoding == HF generate."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from llm_testutils import tiny_llm  # noqa: E402

from clipforge.caption.decoding import DecodeOptions  # noqa: E402
from clipforge.caption.llm import ChatLM, _common_prefix, first_line, resolve_llm  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> ChatLM:
    return ChatLM.load(str(tiny_llm(tmp_path_factory.mktemp("llm") / "tiny")), dtype="fp32")  # exact match


def test_resolve_specs(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_llm(str(tmp_path / "hf")) == (tmp_path / "hf", {})
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert resolve_llm(str(tmp_path / "g")) == (tmp_path / "g", {"gguf_file": "m.gguf"})
    assert resolve_llm(str(tmp_path / "g" / "m.gguf")) == (tmp_path / "g", {"gguf_file": "m.gguf"})
    with pytest.raises(FileNotFoundError):
        resolve_llm(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot load a causal LM"):
        ChatLM.load(str(tmp_path / "hf"))  # a config.json that is no model: a clear error


def test_greedy_batched_with_shared_prefix_equals_hf_generate(lm: ChatLM) -> None:
    msgs = [[{"role": "system", "content": "rewrite this caption keep names"}, {"role": "user", "content": c}]
            for c in ["a dog runs on the grass .", "two men playing ball", "a girl",
                      "the red truck near a big ship on the water"]]  # fmt: skip
    prompts = [lm.prompt(m) for m in msgs]
    ids = [lm.encode(p) for p in prompts]
    assert _common_prefix(ids[:3]) >= 8  # the instructions are shared and encoded once
    opts = DecodeOptions(method="greedy", max_len=12, min_len=0, no_repeat_ngram=0, batch_size=3)
    mine = lm.generate(prompts, opts)
    special = [lm.ids.unk, lm.ids.bos, lm.ids.pad]  # the decoder never emits these: neither may HF here
    for p, got in zip(prompts, mine):
        enc = lm.tok(p, return_tensors="pt", add_special_tokens=False)
        ref = lm.model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=lm.ids.eos,
                                pad_token_id=lm.tok.pad_token_id, suppress_tokens=special)  # fmt: skip
        text = lm.tok.decode(ref[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert got == [first_line(text)]


def test_sampling_is_seeded(lm: ChatLM) -> None:
    prompts = [
        lm.prompt([{"role": "user", "content": c}]) for c in ["a dog", "a red ball on the grass", "a man"]
    ]
    opts = DecodeOptions(
        method="sample", temperature=1.0, top_p=0.95, max_len=10, num_candidates=3, batch_size=2
    )
    a = lm.generate(prompts, opts)
    assert [len(x) for x in a] == [3, 3, 3]
    assert a == lm.generate(prompts, opts)
    other = DecodeOptions(**{**opts.__dict__, "seed": 1})
    assert a != lm.generate(prompts, other)


def test_plain_transcript_without_chat_template(tmp_path: Path) -> None:
    lm = ChatLM.load(str(tiny_llm(tmp_path / "plain", chat_template=False)))
    p = lm.prompt([{"role": "user", "content": "a dog"}])
    assert p.endswith("Assistant:") and "User: a dog" in p


def test_first_line() -> None:
    assert first_line('\n Rewritten caption: "A dog runs."\nMore text') == "A dog runs."
    assert first_line("") == ""
