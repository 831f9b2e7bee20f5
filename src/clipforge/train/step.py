"""One optimization step's forward/backward, with GradCache gradient accumulation.

A contrastive loss couples every pair in the batch, so naive accumulation (loss per micro-batch)
shrinks the set of negatives. GradCache keeps the full-batch loss: (1) embed all micro-batches
without grad, (2) compute the loss on the full batch of cached embeddings and backprop into them,
(3) re-forward each micro-batch with grad and backprop the cached embedding gradients
(``(emb * grad).sum()``). The RNG state is replayed for the re-forward so dropout matches.
Gradients equal the full-batch gradients; memory is one micro-batch of activations.

A batch here is ``{"image": Features, "text": Features, "image_cached": bool, "text_cached": bool,
"img_ids": LongTensor | None, "txt_ids": LongTensor | None}`` where Features are either model
inputs (``{"pixels"}`` / tokens) or cached frozen-prefix features; an optional ``"weights"`` (one per
image, from the text source's ``weight_column``) scales each pair's loss terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.base import ClipModel, Features
from clipforge.models.encode import autocast


def forward_image(model: ClipModel, feats: Features, cached: bool) -> torch.Tensor:
    """Training forward of the image side (with grad through what trains) from pixels or cached features.

    Not an encode helper (those are no-grad, :mod:`clipforge.models.encode`): the name says so."""
    if not cached:
        if model.image_locked:
            with torch.no_grad():
                feats = model.image_features(feats["pixels"])
        else:
            feats = model.image_features(feats["pixels"])
    return F.normalize(model.image_head(feats), dim=-1)


def forward_text(model: ClipModel, feats: Features, cached: bool) -> torch.Tensor:
    """Training forward of the text side from tokens or cached features (see :func:`forward_image`)."""
    if not cached:
        if model.text_locked:
            with torch.no_grad():
                feats = model.text_features(feats)
        else:
            feats = model.text_features(feats)
    return F.normalize(model.text_head(feats), dim=-1)


def scale_and_bias(model: ClipModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """exp(logit_scale) clamped at 100 (CLIP), and the SigLIP bias if the model has one."""
    return model.logit_scale.exp().clamp(max=100.0), model.logit_bias


def split_features(feats: Features, n: int) -> list[Features]:
    """Split every tensor of a feature dict into ``n`` chunks along the batch dim."""
    parts = {k: torch.tensor_split(v, n) for k, v in feats.items()}
    return [{k: parts[k][i] for k in feats} for i in range(n)]


def _rng_state() -> dict[str, Any]:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def forward_backward(
    model: ClipModel,
    loss_fn: nn.Module,
    batch: dict[str, Any],
    accum: int = 1,
    device: torch.device | None = None,
    precision: str = "fp32",
    embed: tuple[Callable, Callable] | None = None,
    coca: Any = None,
    stats: dict[str, float] | None = None,
) -> torch.Tensor:
    """Accumulate the full-batch loss gradient into ``model``'s ``.grad``; return the (local) contrastive loss.

    ``embed``: the (image, text) embedding functions, e.g. torch.compile'd versions of the defaults.
    ``coca``: a :class:`~clipforge.train.coca.CocaHead`: ``coca.weight`` x its caption loss on
    ``batch["caption_tokens"]`` (one caption per image) is added; its value goes to ``stats["caption_loss"]``.
    The caption loss is a per-image mean, so with GradCache each micro-batch adds its share of it in
    pass 3 (weighted by its share of the target tokens): the gradient is still the full batch's.
    """
    device = device or torch.device("cpu")
    embed_images, embed_texts = embed or (forward_image, forward_text)
    ic, tc = bool(batch.get("image_cached")), bool(batch.get("text_cached"))
    ids = (batch.get("img_ids"), batch.get("txt_ids"))
    wkw = {"weights": batch["weights"]} if batch.get("weights") is not None else {}
    tokens = batch.get("caption_tokens") if coca is not None else None
    if accum <= 1:
        with autocast(precision, device):
            img = embed_images(model, batch["image"], ic)
            txt = embed_texts(model, batch["text"], tc)
        scale, bias = scale_and_bias(model)
        loss = loss_fn(img, txt, scale, bias, *ids, **wkw)
        total = loss
        if tokens is not None:
            with autocast(precision, device):
                cap = coca.loss(model, batch["image"], ic, img, tokens)
            total = loss + coca.weight * cap
            if stats is not None:
                stats["caption_loss"] = float(cap.detach())
        total.backward()
        return loss.detach()

    img_parts = split_features(batch["image"], accum)
    txt_parts = split_features(batch["text"], accum)
    img_rng, txt_rng, img_embs, txt_embs = [], [], [], []
    with torch.no_grad():  # pass 1: embeddings only, no activations kept
        for part in img_parts:
            img_rng.append(_rng_state())
            with autocast(precision, device):
                img_embs.append(embed_images(model, part, ic).float())
        for part in txt_parts:
            txt_rng.append(_rng_state())
            with autocast(precision, device):
                txt_embs.append(embed_texts(model, part, tc).float())
    img_all = torch.cat(img_embs).requires_grad_(True)
    txt_all = torch.cat(txt_embs).requires_grad_(True)
    scale, bias = scale_and_bias(model)
    loss = loss_fn(img_all, txt_all, scale, bias, *ids, **wkw)  # pass 2: full-batch loss -> embedding grads
    loss.backward()
    after = _rng_state()
    img_grads = torch.split(img_all.grad, [e.shape[0] for e in img_embs])
    txt_grads = torch.split(txt_all.grad, [e.shape[0] for e in txt_embs])
    tok_parts = torch.tensor_split(tokens, accum) if tokens is not None else [None] * accum
    n_targets = max(coca.n_targets(tokens), 1) if tokens is not None else 1
    cap_total = 0.0
    for part, st, g, tp in zip(img_parts, img_rng, img_grads, tok_parts):  # pass 3: re-forward with grad
        _set_rng_state(st)
        with autocast(precision, device):
            emb = embed_images(model, part, ic)
        out = (emb.float() * g).sum()
        if tp is not None and len(tp):
            with autocast(precision, device):
                cap = coca.loss(model, part, ic, emb, tp) * (coca.n_targets(tp) / n_targets)
            out = out + coca.weight * cap
            cap_total += float(cap.detach())
        out.backward()
    if tokens is not None and stats is not None:
        stats["caption_loss"] = cap_total
    for part, st, g in zip(txt_parts, txt_rng, txt_grads):
        _set_rng_state(st)
        with autocast(precision, device):
            emb = embed_texts(model, part, tc)
        (emb.float() * g).sum().backward()
    _set_rng_state(after)
    return loss.detach()
