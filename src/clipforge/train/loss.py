"""Contrastive losses: CLIP InfoNCE and SigLIP sigmoid, local or all-gathered across ranks, multi-positive.

Both losses take L2-normalized embeddings plus optional *group ids*: an image and a text with the same
id are a positive pair. Without ids the i-th image goes with the i-th text (the usual diagonal). Ids
let several captions of one image in a batch all count as positives (multi-positive): CLIP then uses
the positive mask normalized per row as soft targets, SigLIP labels every positive pair +1.

Optional per-pair ``weights`` (one per image; ALIP-style agreement from a side table) scale the
loss terms of each pair's own rows (image->texts and its texts->images); a weight of 0 removes the
pair's own terms (it still serves as a negative for the others). All-ones weights equal no weights
(bit for bit for CLIP; to rounding for SigLIP, which sums per row first).

Distributed: features are gathered from every rank WITH gradients (:func:`gather_with_grad`, the one
place that does it). Each rank then computes the loss of its local rows against all gathered columns
(``local_loss=True``, the cheap default) or the whole matrix. Either way, after the trainer averages
gradients over ranks, the update equals the single-process update on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipforge.runtime import rank_world


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    (torch.distributed.nn's all_gather backward uses reduce_scatter, which gloo lacks; an all_reduce
    of the full gradient followed by slicing is equivalent and works on every backend.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(s.item()) for s in sizes]
        buf = [x.new_zeros((n, *x.shape[1:])) for n in sizes]
        dist.all_gather(buf, x.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat(buf, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and rank_world()[1] > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order (identity when not distributed)."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def _rank_offset(n_local: int) -> int:
    """Index of this rank's first row in the gathered batch."""
    if not is_distributed():
        return 0
    rank, world = rank_world()
    sizes: list = [None] * world
    dist.all_gather_object(sizes, n_local)
    return int(sum(sizes[:rank]))


def positive_mask(
    row_ids: torch.Tensor | None, col_ids: torch.Tensor | None, n_rows: int, n_cols: int, offset: int = 0
) -> torch.Tensor:
    """Bool [n_rows, n_cols]: True where row and column are a positive pair.

    Without ids, row i pairs with column ``offset + i`` (this rank's slice of the gathered batch).
    """
    if row_ids is None or col_ids is None:
        if n_cols < offset + n_rows:
            raise ValueError("without group ids every image needs exactly one text (same batch size)")
        mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
        mask[torch.arange(n_rows), offset + torch.arange(n_rows)] = True
        return mask
    return row_ids.view(-1, 1) == col_ids.view(1, -1)


def soft_cross_entropy(
    logits: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of CE against the positive mask normalized per row (one-hot mask = plain CE).

    ``weights`` (one per row): each row's CE times its weight before the mean (a 0 drops the row)."""
    pos = pos.to(logits.device)
    counts = pos.sum(1)
    if (counts == 0).any():
        raise ValueError("a row has no positive: every image needs a caption in the batch and vice versa")
    target = pos.float() / counts.unsqueeze(1)
    rows = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return rows.mean() if weights is None else (rows * weights.to(rows)).mean()


def text_weights(weights: torch.Tensor | None, n_img: int, n_txt: int) -> torch.Tensor | None:
    """Per-text weights from per-image ones: the k captions of image i follow each other in a batch."""
    if weights is None:
        return None
    if weights.shape[0] != n_img or n_txt % max(n_img, 1):
        raise ValueError(f"{weights.shape[0]} weights for {n_img} images and {n_txt} texts")
    return weights.repeat_interleave(n_txt // max(n_img, 1))


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: (CE(image->text) + CE(text->image)) / 2 at temperature 1/scale."""

    def __init__(self, local_loss: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img, txt = img.float(), txt.float()
        w_img, w_txt = weights, text_weights(weights, img.shape[0], txt.shape[0])
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
        all_img_ids = gather_with_grad(img_ids) if img_ids is not None else None
        all_txt_ids = gather_with_grad(txt_ids) if txt_ids is not None else None
        if self.local_loss and is_distributed():
            logits_i = scale * img @ all_txt.T
            logits_t = scale * txt @ all_img.T
            oi, ot = _rank_offset(img.shape[0]), _rank_offset(txt.shape[0])
            pos_i = positive_mask(img_ids, all_txt_ids, img.shape[0], all_txt.shape[0], oi)
            pos_t = positive_mask(txt_ids, all_img_ids, txt.shape[0], all_img.shape[0], ot)
        else:
            logits_i = scale * all_img @ all_txt.T
            logits_t = logits_i.T
            pos_i = positive_mask(all_img_ids, all_txt_ids, all_img.shape[0], all_txt.shape[0])
            pos_t = pos_i.T
            if weights is not None:  # rows are the whole gathered batch
                w_img, w_txt = gather_with_grad(w_img.float()), gather_with_grad(w_txt.float())
        if bias is not None:
            logits_i, logits_t = logits_i + bias, logits_t + bias
        return (soft_cross_entropy(logits_i, pos_i, w_img) + soft_cross_entropy(logits_t, pos_t, w_txt)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss: every (image, text) pair is a binary problem, label +1 for positives else -1.

    Sum over pairs divided by the number of images (as in the paper). The model owns the learnable
    temperature (init log 10) and bias (init -10): ``loss="siglip"`` makes the trainer check they exist.
    Distributed, each rank scores its local images against all gathered texts.
    """

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if bias is None:
            raise ValueError("SigLIP needs a model with logit_bias (init -10): build it with loss=siglip")
        img, txt = img.float(), txt.float()
        all_txt = gather_with_grad(txt)
        all_txt_ids = gather_with_grad(txt_ids) if txt_ids is not None else None
        offset = _rank_offset(img.shape[0])
        pos = positive_mask(img_ids, all_txt_ids, img.shape[0], all_txt.shape[0], offset).to(img.device)
        logits = scale * img @ all_txt.T + bias
        labels = pos.float() * 2 - 1
        if weights is not None:  # each image's row of pairs scaled by its weight
            return -(F.logsigmoid(labels * logits).sum(1) * weights.to(logits)).sum() / img.shape[0]
        return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def build_loss(name: str, local_loss: bool = True) -> nn.Module:
    if name == "clip":
        return ClipLoss(local_loss=local_loss)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown loss {name!r}: use clip or siglip")
