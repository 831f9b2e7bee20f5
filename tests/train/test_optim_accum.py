"""Weight-decay groups, the warmup+cosine schedule, and GradCache accumulation == full-batch grads."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_model import make_tiny

from clipforge.train.loop import prepare_for_loss
from clipforge.train.loss import ClipLoss, SigLipLoss
from clipforge.train.optim import build_optimizer, lr_at, param_groups
from clipforge.train.step import forward_backward


def test_no_decay_on_norms_biases_embeddings_scale():
    model = make_tiny()
    prepare_for_loss(model, "siglip")
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "img_proj.0.weight" in decayed and "conv.0.weight" in decayed
    for n in (
        "logit_scale",
        "logit_bias",
        "tok.weight",
        "txt_norm.weight",
        "img_proj.0.bias",
        "conv.1.weight",
    ):
        assert n in plain, n
    assert not decayed & plain


def test_optimizer_skips_frozen_params():
    model = make_tiny(lock_image=1, lock_text=1)
    opt = build_optimizer(model, 1e-3, 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.conv[0].weight) not in in_opt and id(model.img_proj[0].weight) in in_opt


def test_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5, abs=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, 1.0, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lrs[35] == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


def _batch(model, n=12, k=1):
    g = torch.Generator().manual_seed(1)
    words = ["dog", "cat", "red", "ball", "grass", "runs", "a", "the", "man", "sky"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, 10, (3 + j % 4,), generator=g)) for j in range(n * k)
    ]
    b = {
        "image": {"pixels": torch.randn(n, 3, 16, 16, generator=g)},
        "text": dict(model.tokenize(texts)),
        "img_ids": None,
        "txt_ids": None,
    }
    if k > 1:
        b["img_ids"], b["txt_ids"] = torch.arange(n), torch.arange(n).repeat_interleave(k)
    return b


def _grads(model, loss_fn, batch, accum):
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, loss_fn, batch, accum)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name,k", [("clip", 1), ("clip", 2), ("siglip", 1)])
def test_gradcache_equals_full_batch(loss_name, k):
    model = make_tiny(seed=3)
    prepare_for_loss(model, loss_name)
    model.eval()  # BatchNorm running stats: micro-batch statistics would differ by construction
    loss_fn = SigLipLoss() if loss_name == "siglip" else ClipLoss()
    batch = _batch(model, k=k)
    full_loss, full = _grads(model, loss_fn, batch, 1)
    for accum in (3, 4):
        loss, acc = _grads(model, loss_fn, batch, accum)
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert acc.keys() == full.keys() and len(acc) >= 10
        for n in full:
            torch.testing.assert_close(acc[n], full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_naive_accumulation_would_differ():
    """Sanity: the test above can fail — per-micro-batch losses give different gradients."""
    model = make_tiny(seed=3).eval()
    loss_fn = ClipLoss()
    batch = _batch(model)
    _, full = _grads(model, loss_fn, batch, 1)
    model.zero_grad(set_to_none=True)
    for i in range(3):
        sl = slice(4 * i, 4 * i + 4)
        part = {
            "image": {"pixels": batch["image"]["pixels"][sl]},
            "text": {k: v[sl] for k, v in batch["text"].items()},
        }
        forward_backward(model, loss_fn, part, 1)
    assert not torch.allclose(model.img_proj[0].weight.grad / 3, full["img_proj.0.weight"], rtol=1e-3)
