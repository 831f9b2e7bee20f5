"""Compositionality probes: deterministic generation, real negatives, a perfect model scores 100%,
the blind-LM filter keeps/drops by its margin, the CLI writes results + probes.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from evalutils import TinyClip
from torch import nn

from clipforge.cli import main
from clipforge.data.transforms import PreprocessConfig
from clipforge.evaluate import blindlm, probegen
from clipforge.evaluate.compositionality import bootstrap_ci, score_items, summarize
from clipforge.evaluate.config import CompositionalityConfig
from clipforge.models.base import ClipModel, ModelConfig

CAPTIONS = {
    "img1": ["A black dog is running on the grass .", "Two men sit on a bench next to a tree ."],
    "img2": ["A little girl in a pink shirt holds a red ball .", "a boy jumping into a pool"],
    "img3": ["A man riding a horse in front of a white building .", "the brown and white dog plays"],
    "img4": ["Three children are standing behind a fence ."],
    "img5": ["A woman with a blue umbrella walks along the wall ."],
}


class CharTokenizer:
    """Character codes: an order-sensitive text encoder needs order in its input."""

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        n = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        for r, t in enumerate(texts):
            ids[r, : len(t)] = torch.tensor([min(ord(c), 255) for c in t])
            mask[r, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class OrderSensitiveText(ClipModel):
    """Text embedding: sum over positions of char embedding * position embedding (order matters)."""

    def __init__(self, dim: int = 32) -> None:
        cfg = ModelConfig(backend="scratch", spec="test:order", embed_dim=dim,
                          preprocess=PreprocessConfig(size=8).to_dict())  # fmt: skip
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        self.char = nn.Parameter(torch.randn(256, dim, generator=g))
        self.pos = nn.Parameter(torch.randn(256, dim, generator=g))
        self.img = nn.Linear(3, dim)
        self.tokenizer = CharTokenizer()

    def image_features(self, pixels):
        return {"x": pixels.mean((2, 3))}

    def image_head(self, feats):
        return self.img(feats["x"])

    def text_features(self, tokens):
        m = tokens["attention_mask"].unsqueeze(-1).float()
        n = tokens["input_ids"].shape[1]
        return {"x": (self.char[tokens["input_ids"]] * self.pos[:n] * m).sum(1)}

    def text_head(self, feats):
        return feats["x"]


def test_generation_is_deterministic_and_negatives_differ() -> None:
    a = probegen.generate(CAPTIONS, seed=0)
    assert a == probegen.generate(CAPTIONS, seed=0)
    assert a != probegen.generate(CAPTIONS, seed=1)
    assert {it["type"] for it in a} == set(probegen.PROBE_TYPES)  # every rule fires on these captions
    for it in a:
        assert it["positive"] in CAPTIONS[it["image"]]
        assert it["candidates"] and all(c.lower() != it["positive"].lower() for c in it["candidates"])
        assert len(set(it["candidates"])) == len(it["candidates"])
    # a type's items do not depend on which other types were asked for
    only = probegen.generate(CAPTIONS, ["swap_att"], seed=0)
    assert only == [it for it in a if it["type"] == "swap_att"]


def test_rules_on_known_captions() -> None:
    rng = np.random.default_rng(0)
    negs = probegen.negatives("swap_att", "the brown and white dog plays", rng)
    assert negs == ["the white and brown dog plays"]
    negs = probegen.negatives("replace_att", "A black dog runs .", np.random.default_rng(0), k=20)
    colours = probegen.word_lists().attributes["colours"]
    want = {f"{'An' if c[0] in 'aeiou' else 'A'} {c} dog runs ." for c in colours if c != "black"}
    assert set(negs) == want  # a colour only by a colour, the article agrees ("An orange dog")
    assert probegen.negatives("order_reverse", "A dog runs .", rng) == ["Runs dog a ."]
    assert probegen.negatives("replace_obj", "nothing listed here", rng) == []
    with pytest.raises(ValueError, match="unknown probe type"):
        probegen.generate(CAPTIONS, ["nope"])


def test_true_caption_embedding_scores_100() -> None:
    """A fake whose image embedding IS the true caption's text embedding must win every item."""
    model = OrderSensitiveText().eval()
    caps = {k: v[:1] for k, v in CAPTIONS.items()}  # one positive per image, shared by all types
    items = blindlm.blind_filter(probegen.generate(caps, seed=0), None, None)
    from clipforge.models.encode import embed_texts

    pos = embed_texts(model, [caps[k][0] for k in caps])
    emb = {(k, None): e for k, e in zip(caps, pos)}
    cfg = CompositionalityConfig(progress=False, bootstrap=50)
    correct = score_items(model, items, emb, cfg)
    assert len(items) > 10 and correct.all()
    per = summarize(items, correct, cfg)
    assert all(m["accuracy"] == 1.0 and m["accuracy_ci95_lo"] == 1.0 for m in per.values())
    assert all(m["blind_accuracy"] is None for m in per.values())  # no LM: no blind number


class FakeLM:
    name = "fake"

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def logprob(self, texts, progress=None):
        return np.array([self.scores[t] for t in texts])


def test_blind_filter_keeps_and_drops_by_margin() -> None:
    items = [
        {"id": "a", "type": "t", "image": "k", "positive": "P1", "candidates": ["far", "near"]},
        {"id": "b", "type": "t", "image": "k", "positive": "P2", "candidates": ["bad"]},
        {"id": "c", "type": "t", "image": "k", "positive": "P3", "candidates": ["better"]},
    ]
    lm = FakeLM({"P1": -10.0, "far": -15.0, "near": -10.8, "P2": -10.0, "bad": -11.5, "P3": -10.0,
                 "better": -9.5})  # fmt: skip
    blindlm.blind_filter(items, lm, 1.0)
    assert items[0]["negative"] == "near" and items[0]["blind_kept"] is True  # the closest candidate
    assert items[0]["lm_first"] == -15.0  # the unfiltered probe's negative, for the naive baseline
    assert items[1]["blind_kept"] is False  # 1.5 nats away
    assert items[2]["blind_kept"] is True and items[2]["lm_neg"] > items[2]["lm_pos"]
    blindlm.blind_filter(items, lm, 2.0)
    assert items[1]["blind_kept"] is True
    blindlm.blind_filter(items, lm, None)  # scoring only: first candidate, nothing dropped
    assert items[0]["negative"] == "far" and items[0]["blind_kept"] is None and items[0]["lm_neg"] == -15.0
    blindlm.blind_filter(items, None, 1.0)
    assert items[0]["lm_pos"] is None and items[0]["blind_kept"] is None


def test_bootstrap_interval() -> None:
    x = np.array([1] * 70 + [0] * 30)
    lo, hi = bootstrap_ci(x, 500, seed=3)
    assert (lo, hi) == bootstrap_ci(x, 500, seed=3) and lo < 0.7 < hi and hi - lo < 0.25


def tiny_llama_dir(path: Path) -> Path:
    """A random 2-layer Llama with a word-level tokenizer saved as an HF dir (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w.lower() for caps in CAPTIONS.values() for c in caps for w in c.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_hf_lm_scores_do_not_depend_on_batch_padding(tmp_path: Path) -> None:
    lm = blindlm.load_lm(str(tiny_llama_dir(tmp_path / "lm")), batch_size=8)
    short, long = "a dog", "a black dog is running on the grass"
    alone = lm.logprob([short])
    both = lm.logprob([short, long])
    assert np.isfinite(both).all() and both[0] == pytest.approx(alone[0], abs=1e-4)
    assert both[0] > both[1]  # more tokens, more nats spent
    with pytest.raises(FileNotFoundError):
        blindlm.load_lm(str(tmp_path / "none"))


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipforge.models

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: TinyClip(seed=0).eval())


def test_cli_writes_results_and_reusable_probes(patched, color_shards, tmp_path: Path, capsys) -> None:
    shards, _ = color_shards
    lm = tiny_llama_dir(tmp_path / "lm")
    common = ["--model", "t0", "--captions", str(shards[0]), "--workers", "0", "--threads", "1",
              "--bootstrap", "50"]  # fmt: skip
    assert main(["eval", "compositionality", *common, "--output", str(tmp_path / "a"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    tasks = {r["task"] for r in res["results"]}
    assert {"compositionality/order_reverse", "compositionality/replace_att"} <= tasks  # colour captions
    assert all(r["blind_filter"] == "off (no --llm)" for r in res["results"])
    rows = [json.loads(x) for x in (tmp_path / "a" / "probes.jsonl").read_text().splitlines()]
    assert rows and all(r["negative"] != r["positive"] and r["blind_kept"] is None for r in rows)

    argv = ["eval", "compositionality", *common, "--output", str(tmp_path / "b"), "--llm", str(lm),
            "--blind-margin", "2.0"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "blind LM acc" in out and "blind filter: on: lm, margin 2.0 nats" in out
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    m = saved["results"][0]["metrics"]
    assert m["blind_accuracy"] is not None and m["n_items"] <= m["n_generated"]
    assert 0 <= m["blind_accuracy_unfiltered"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "b" / "probes.jsonl").read_text().splitlines()]
    assert all(r["blind_kept"] == (abs(r["lm_pos"] - r["lm_neg"]) <= 2.0) for r in rows)

    # another model on exactly the same probe file
    argv = ["eval", "compositionality", *common, "--output", str(tmp_path / "c"), "--probes",
            str(tmp_path / "b" / "probes.jsonl"), "--json"]  # fmt: skip
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert sum(r["metrics"]["n_items"] for r in again["results"]) == sum(r["blind_kept"] for r in rows)
    assert main(["eval", "compare", str(tmp_path / "b" / "results.json"), str(tmp_path / "c" / "results.json"),
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["rows"]


def test_eval_run_with_compositionality(patched, color_shards, tmp_path: Path, capsys) -> None:
    import shutil

    shards, _ = color_shards
    root = tmp_path / "data"
    (root / "flickr8k").mkdir(parents=True)
    shutil.copy(shards[0], root / "flickr8k" / "test-000000.tar")
    argv = ["eval", "run", "--model", "t0", "--datasets", "flickr8k", "--data-root", str(root), "--workers", "0",
            "--output", str(tmp_path / "out"), "--compositionality"]  # fmt: skip
    assert main(argv) == 0
    assert "compositionality/order_reverse" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"][0]["task"] == "retrieval" and len(saved["results"]) > 3
    assert (tmp_path / "out" / "compositionality" / "probes.jsonl").exists()


class CountingLM(FakeLM):
    """A fake LM with known scores that records which texts it was asked to score."""

    def __init__(self, scores: dict[str, float], fingerprint: str | None = "fp-a") -> None:
        super().__init__(scores)
        self.fingerprint = fingerprint
        self.asked: list[str] = []

    def logprob(self, texts, progress=None):
        self.asked += list(texts)
        return super().logprob(texts, progress)


def test_adversarial_selection_picks_the_likeliest_candidate_within_the_margin() -> None:
    scores = {"P": -10.0, "low": -10.9, "high": -9.4, "far_above": -7.0, "far_below": -14.0}
    item = {"id": "a", "type": "t", "image": "k", "positive": "P",
            "candidates": ["far_below", "low", "high", "far_above"]}  # fmt: skip
    (it,) = blindlm.blind_filter([dict(item)], FakeLM(scores), 1.0, selection="likeliest")
    assert it["negative"] == "high" and it["blind_kept"] is True  # the LM's favourite inside [-11, -9]
    assert it["lm_neg"] > it["lm_pos"]  # so the blind LM gets this item wrong
    (it,) = blindlm.blind_filter([dict(item)], FakeLM(scores), 1.0, selection="closest")
    assert it["negative"] == "high"  # 0.6 nats beats 0.9
    scores["high"] = -8.0  # now outside: likeliest and closest agree on "low"
    for sel in ("likeliest", "closest"):
        (it,) = blindlm.blind_filter([dict(item)], FakeLM(scores), 1.0, selection=sel)
        assert it["negative"] == "low" and it["blind_kept"] is True
    (it,) = blindlm.blind_filter([dict(item)], FakeLM(scores), 0.5, selection="likeliest")
    assert it["blind_kept"] is False and it["negative"] == "low"  # nothing inside: the closest, dropped
    with pytest.raises(ValueError, match="selection"):
        blindlm.blind_filter([dict(item)], FakeLM(scores), 1.0, selection="random")


def test_groups_try_later_captions_only_when_needed() -> None:
    """per_image: a group's second caption is scored only when its first gave no kept negative."""
    g = {"type": "t", "image": "k"}
    items = [
        {**g, "id": "t/a/0", "group": "t/a", "attempt": 0, "positive": "A0", "candidates": ["a0x"]},
        {**g, "id": "t/a/1", "group": "t/a", "attempt": 1, "positive": "A1", "candidates": ["a1x"]},
        {**g, "id": "t/b/0", "group": "t/b", "attempt": 0, "positive": "B0", "candidates": ["b0x"]},
        {**g, "id": "t/b/1", "group": "t/b", "attempt": 1, "positive": "B1", "candidates": ["b1x"]},
    ]
    lm = CountingLM({"A0": -10, "a0x": -10.5, "A1": -10, "a1x": -10.2, "B0": -10, "b0x": -20, "B1": -10,
                     "b1x": -10.3})  # fmt: skip
    out = blindlm.blind_filter(items, lm, 1.0, selection="likeliest")
    assert [it["id"] for it in out] == ["t/a/0", "t/b/1"]  # one per group, the first kept
    assert all(it["blind_kept"] for it in out)
    assert "A1" not in lm.asked and "a1x" not in lm.asked  # group a was settled by its first caption
    assert out[1]["negative"] == "b1x"
    # without an LM (or without the filter): each group's first caption, nothing else scored
    assert [it["id"] for it in blindlm.blind_filter(items, None, 1.0)] == ["t/a/0", "t/b/0"]


def test_generate_per_image_groups_and_frequency_weighting() -> None:
    a = probegen.generate(CAPTIONS, ["replace_obj", "add_obj"], seed=0, per_image=2, frequency=True)
    assert a == probegen.generate(CAPTIONS, ["replace_obj", "add_obj"], seed=0, per_image=2, frequency=True)
    one = probegen.generate(CAPTIONS, ["replace_obj", "add_obj"], seed=0, per_image=1, frequency=True)
    # the first attempt of each group is the item per_image=1 gives, ids aside
    firsts = [{k: v for k, v in it.items() if k not in ("id", "group", "attempt")}
              for it in a if it["attempt"] == 0]  # fmt: skip
    assert firsts == [{k: v for k, v in it.items() if k != "id"} for it in one]
    assert any(it["attempt"] == 1 for it in a) and len({it["id"] for it in a}) == len(a)
    # frequency: only words the caption set uses are proposed (no "camel", no "elephant" here)
    used = probegen.word_counts(CAPTIONS)
    for it in a:
        new = {w.lower() for c in it["candidates"] for w in c.split()} - set(it["positive"].lower().split())
        assert new <= set(used) | {"with", "a", "an"}, new
    rng = np.random.default_rng(0)
    counts = probegen.word_counts({"x": ["a black dog", "a white dog", "a white cat"]})
    negs = probegen.negatives("replace_att", "A black dog runs .", rng, k=20, counts=counts)
    assert negs == ["A white dog runs ."]  # the only other colour the captions use


def test_lm_score_cache_is_keyed_by_fingerprint(tmp_path: Path) -> None:
    scores = {"x": -1.0, "y": -2.0, "z": -3.0}
    lm = CountingLM(scores)
    cached = blindlm.CachedLM(lm, tmp_path)
    assert list(cached.logprob(["x", "y", "x"])) == [-1.0, -2.0, -1.0] and lm.asked == ["x", "y"]
    assert cached.path == tmp_path / "fp-a.jsonl" and cached.stats["scored"] == 2
    with open(cached.path, "a") as f:
        f.write('{"text": "torn')  # a killed run's last line
    again = CountingLM(scores)
    c2 = blindlm.CachedLM(again, tmp_path)
    assert list(c2.logprob(["y", "z"])) == [-2.0, -3.0] and again.asked == ["z"]  # only the new text
    assert c2.bad_lines == 1 and c2.stats == {"cached": 1, "scored": 1, "seconds": c2.stats["seconds"]}
    other = CountingLM({t: v + 5 for t, v in scores.items()}, fingerprint="fp-b")  # another LM
    assert list(blindlm.CachedLM(other, tmp_path).logprob(["x"])) == [4.0] and other.asked == ["x"]
    with pytest.raises(ValueError, match="fingerprint"):
        blindlm.CachedLM(CountingLM(scores, fingerprint=None), tmp_path)


def test_lm_fingerprint_follows_weights_and_dtype(tmp_path: Path) -> None:
    f = tmp_path / "w.gguf"
    f.write_bytes(b"weights-1")
    a = blindlm.lm_fingerprint([f], "float32")
    assert a == blindlm.lm_fingerprint([f], "float32") and a != blindlm.lm_fingerprint([f], "bfloat16")
    f.write_bytes(b"weights-2")
    assert blindlm.lm_fingerprint([f], "float32") != a


def test_only_the_probed_images_are_embedded_and_match_the_shard_path(color_shards) -> None:
    """Generated probes embed just the images they use, and those rows equal the full shard embedding."""
    from clipforge.evaluate.compositionality import embed_keys, read_caption_shards
    from clipforge.evaluate.embed import embed_images

    shards, _ = color_shards
    model = TinyClip(seed=0).eval()
    caps, _ = read_caption_shards([str(shards[0])])
    full = embed_images(model, [str(shards[0])], captions=True, workers=0, progress=False)
    assert {k: caps[k] for k in full.keys} == dict(zip(full.keys, full.captions))  # images are not decoded
    some = set(sorted(caps)[::3])
    emb = embed_keys(model, [str(shards[0])], some, CompositionalityConfig(batch_size=4))
    assert set(emb) == {(k, None) for k in some & set(full.keys)}  # an undecodable image is left out
    rows = dict(zip(full.keys, full.emb.numpy()))
    assert all(np.allclose(emb[(k, None)], rows[k], atol=1e-5) for k in some & set(full.keys))
