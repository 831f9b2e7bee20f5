"""The shared fake CLIP (tests/fake_clip.py): what the area tests lean on without checking it themselves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fake_clip import HashTokenizer, TinyClip, tiny_config

TEXTS = ["a red square", "Two dogs, running on the beach at dusk!", "", "x"]


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (TinyClip(tiny_config(16, 32), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.img.weight, c.img.weight) and not torch.equal(a.emb.weight, c.emb.weight)


@pytest.mark.parametrize("split", ["head", "features", "locked"])
@pytest.mark.parametrize("text_proj", [True, False])
def test_text_embedding_ignores_padding_and_batch_mates(split, text_proj):
    m = TinyClip(tiny_config(16, 32), split=split, text_proj=text_proj).eval()
    together = m.encode_text(m.tokenize(TEXTS))
    alone = torch.cat([m.encode_text(m.tokenize([t])) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    padded = m.encode_text(HashTokenizer(length=24)(TEXTS))  # more padding: the same embeddings
    torch.testing.assert_close(padded, together, rtol=0, atol=1e-6)


def test_split_moves_work_between_features_and_head_not_the_embedding():
    px = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = {s: TinyClip(tiny_config(16, 32), split=s).eval() for s in ("head", "features", "locked")}
    for s, m in models.items():
        torch.testing.assert_close(m.encode_image(px), models["head"].encode_image(px), rtol=0, atol=0)
        feats = m.image_features(px)
        assert set(feats) == ({"pixels"} if s == "head" else {"pooled"})
        torch.testing.assert_close(m.image_head(feats), m.encode_image(px, normalize=False), rtol=0, atol=0)
    locked = models["locked"]
    assert locked.image_locked and locked.text_locked and not models["features"].image_locked
    assert (
        not locked.emb.weight.requires_grad and locked.img.weight.requires_grad
    )  # frozen bag, trainable heads


def test_tokenizer_knobs():
    ids = HashTokenizer(max_len=3, length=5, empty_id=7)(TEXTS)["input_ids"]
    assert ids.shape == (4, 5) and (ids[:, 3:] == 0).all() and ids[2].tolist() == [7, 0, 0, 0, 0]
    tok = HashTokenizer(vocab=97, max_len=None, strip=".,!?", fixed={"red": 1})
    assert tok(["Red! red"])["input_ids"].tolist() == [[1, 1]]
    assert all(2 <= tok.word_id(w) < 97 for w in ("dog", "beach", "x"))
    assert HashTokenizer()(["   "])["input_ids"].tolist() == [[0]]  # no words, no empty_id: one pad id


def test_token_ids_are_the_same_in_another_process():
    """A ``py:`` spec rebuilds the fake in worker processes: ids must not depend on Python's hash seed."""
    here = HashTokenizer()(TEXTS)["input_ids"].tolist()
    here_dir = str(Path(__file__).parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here_dir!r}); from fake_clip import HashTokenizer;"
        f" print(json.dumps(HashTokenizer()({TEXTS!r})['input_ids'].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == here


def test_logit_bias_and_scale_from_the_config():
    m = TinyClip(tiny_config(8, 16, init_logit_bias=-10.0, init_logit_scale=2.0), order=("img", "emb", "txt"))
    px = torch.rand(2, 3, 16, 16)
    img, txt, scale, bias = m(px, m.tokenize(["a", "b c"]))
    assert (
        img.shape == txt.shape == (2, 8)
        and bias.item() == -10.0
        and scale.item() == pytest.approx(math.exp(2.0))
    )
