"""Losses against naive loop implementations, multi-positive targets, and the 2-process gather."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.train.loss import ClipLoss, SigLipLoss


def naive_clip(img, txt, scale, img_ids=None, txt_ids=None):
    """Row-by-row symmetric soft cross-entropy, written with Python loops."""
    n_i, n_t = img.shape[0], txt.shape[0]
    img_ids = list(range(n_i)) if img_ids is None else img_ids.tolist()
    txt_ids = list(range(n_t)) if txt_ids is None else txt_ids.tolist()
    total_i = 0.0
    for i in range(n_i):
        logits = [scale * float(img[i] @ txt[j]) for j in range(n_t)]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [j for j in range(n_t) if txt_ids[j] == img_ids[i]]
        total_i += -sum(logits[j] - lse for j in pos) / len(pos)
    total_t = 0.0
    for j in range(n_t):
        logits = [scale * float(txt[j] @ img[i]) for i in range(n_i)]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [i for i in range(n_i) if img_ids[i] == txt_ids[j]]
        total_t += -sum(logits[i] - lse for i in pos) / len(pos)
    return (total_i / n_i + total_t / n_t) / 2


def naive_siglip(img, txt, scale, bias, img_ids=None, txt_ids=None):
    n_i, n_t = img.shape[0], txt.shape[0]
    img_ids = list(range(n_i)) if img_ids is None else img_ids.tolist()
    txt_ids = list(range(n_t)) if txt_ids is None else txt_ids.tolist()
    total = 0.0
    for i in range(n_i):
        for j in range(n_t):
            z = scale * float(img[i] @ txt[j]) + bias
            y = 1.0 if img_ids[i] == txt_ids[j] else -1.0
            total += math.log1p(math.exp(-y * z))
    return total / n_i


def _feats(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_clip_loss_matches_naive():
    img, txt = _feats(6, seed=1), _feats(6, seed=2)
    got = ClipLoss()(img, txt, torch.tensor(10.0, dtype=torch.float64))
    assert got.item() == pytest.approx(naive_clip(img, txt, 10.0), rel=1e-5)


def test_clip_loss_multi_positive_matches_naive():
    img, txt = _feats(3, seed=3), _feats(6, seed=4)
    img_ids, txt_ids = torch.arange(3), torch.tensor([0, 0, 1, 1, 2, 2])
    got = ClipLoss()(img, txt, torch.tensor(5.0), None, img_ids, txt_ids)
    assert got.item() == pytest.approx(naive_clip(img, txt, 5.0, img_ids, txt_ids), rel=1e-5)
    # two captions of one image: treating them as negatives (diagonal ids over duplicated images) differs
    plain = ClipLoss()(img.repeat_interleave(2, 0), txt, torch.tensor(5.0))
    assert abs(plain.item() - got.item()) > 1e-3


def test_siglip_loss_matches_naive_and_needs_bias():
    img, txt = _feats(5, seed=5), _feats(5, seed=6)
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert got.item() == pytest.approx(naive_siglip(img, txt, 10.0, -10.0), rel=1e-5)
    ids = torch.tensor([0, 0, 1, 2, 2])
    got = SigLipLoss()(img, txt, torch.tensor(3.0), torch.tensor(-1.0), ids, ids)
    assert got.item() == pytest.approx(naive_siglip(img, txt, 3.0, -1.0, ids, ids), rel=1e-5)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, torch.tensor(10.0), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_data():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    w_img, w_txt = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    ids = torch.tensor(
        [0, 0, 1, 2, 3, 3, 4, 5]
    )  # multi-positive groups, crossing the rank boundary? no: 0-3|4-7
    return x_img, x_txt, w_img, w_txt, ids


def _loss_and_grads(loss_fn, x_img, x_txt, w_img, w_txt, ids, world):
    w_img, w_txt = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
    scale, bias = torch.tensor(7.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    img, txt = F.normalize(x_img @ w_img, dim=-1), F.normalize(x_txt @ w_txt, dim=-1)
    loss = loss_fn(img, txt, scale, bias, ids, ids) if ids is not None else loss_fn(img, txt, scale, bias)
    loss.backward()
    grads = [w_img.grad, w_txt.grad, scale.grad, bias.grad]
    if world > 1:  # the trainer's data-parallel averaging
        for g in grads:
            torch.distributed.all_reduce(g)
            g /= world
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        loss = t / world
    return loss.item(), [g.clone() for g in grads]


CASES = [("clip_local", True), ("clip_global", False), ("siglip", None)]


def _make(name):
    return SigLipLoss() if name == "siglip" else ClipLoss(local_loss=dict(CASES)[name])


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x_img, x_txt, w_img, w_txt, ids = _model_and_data()
    sl = slice(rank * 4, rank * 4 + 4)
    res = {}
    for name, _ in CASES:
        for multi in (False, True):
            res[(name, multi)] = _loss_and_grads(
                _make(name), x_img[sl], x_txt[sl], w_img, w_txt, ids[sl] if multi else None, world
            )
    if rank == 0:
        torch.save(res, os.path.join(out_dir, "dist.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gather_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    dist_res = torch.load(tmp_path / "dist.pt", weights_only=False)
    x_img, x_txt, w_img, w_txt, ids = _model_and_data()
    for name, _ in CASES:
        for multi in (False, True):
            loss1, grads1 = _loss_and_grads(
                _make(name), x_img, x_txt, w_img, w_txt, ids if multi else None, 1
            )
            loss2, grads2 = dist_res[(name, multi)]
            assert loss2 == pytest.approx(loss1, rel=1e-5), (name, multi)
            for g1, g2 in zip(grads1, grads2):
                torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
