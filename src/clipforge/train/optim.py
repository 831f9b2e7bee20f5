"""AdamW with decoupled weight decay on matrices only, warmup + cosine schedule, gradient clipping.

Norm weights, biases, embeddings and the logit scale/bias get no weight decay: decaying them pulls
scales toward 0 and fights the temperature (CLIP/open_clip practice). The schedule is a pure function
of the step, so resuming only needs the step count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def wants_decay(name: str, param: torch.Tensor, owner: nn.Module | None = None) -> bool:
    """Decay 2-D+ weight matrices; never norms, biases, embeddings, the temperature or the SigLIP bias."""
    if param.ndim < 2 or isinstance(owner, NO_DECAY_MODULES):
        return False
    leaf = name.rsplit(".", 1)[-1].lower()
    return not ("embed" in leaf or leaf.startswith("logit_") or "norm" in leaf)


def param_groups(
    model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """Decay / no-decay groups; ``lr_scales``: submodule name -> lr multiplier (its own groups, after)."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = mod
    scales = dict(lr_scales or {})
    by_scale: dict[str | None, tuple[list, list]] = {None: ([], [])}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sub = name.split(".", 1)[0]
            decay, no_decay = by_scale.setdefault(sub if sub in scales else None, ([], []))
            (decay if wants_decay(name, p, owners.get(name)) else no_decay).append(p)
    groups = []
    for sub, (decay, no_decay) in by_scale.items():
        extra = {} if sub is None else {"lr_scale": float(scales[sub])}
        groups += [
            {"params": decay, "weight_decay": weight_decay, **extra},
            {"params": no_decay, "weight_decay": 0.0, **extra},
        ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, lr_scales)
    if not groups:
        raise ValueError("the model has no trainable parameters (all towers locked and no heads?)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_grad(params: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm (if ``max_norm``); return the norm before clipping.

    Under FSDP some grads are DTensor shards: their norm is reduced over ranks (``full_tensor``) and
    combined with the replicated grads' norm, so every rank clips by the same, true global norm.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    squares = []
    for group in (plain, sharded):
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad.detach().float() for p in group])
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squares.append(norm**2)
    total = torch.stack(squares).sum().sqrt()
    if max_norm:
        for group in (plain, sharded):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)
