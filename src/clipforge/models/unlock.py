"""Partial unlock of an arbitrary HF tower: train its last N blocks (and everything after them).

"Blocks" are the elements of the tower's longest ``nn.ModuleList`` (CLIP/SigLIP ``encoder.layers``,
ViT/DINOv2 ``encoder.layer``, ConvNeXt's deepest stage...). Parameters are registered in forward order
in HF modeling files (embeddings, blocks, final norm / pooler), so the trainable set is every
parameter from the first unlocked block on. The frozen prefix then builds no autograd graph: its
activations are not kept and backward stops at the first trainable block.
"""

from __future__ import annotations

from torch import nn


def block_list(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the longest ModuleList under ``module`` (the repeated blocks)."""
    lists = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no block list (nn.ModuleList) to unlock partly")
    return max(lists, key=lambda item: len(item[1]))


def unlock_last_blocks(module: nn.Module, n: int) -> list[str]:
    """Freeze ``module`` except its last ``n`` blocks and what follows them; returns the trainable names."""
    name, blocks = block_list(module)
    if not 0 < n <= len(blocks):
        raise ValueError(
            f"unlock={n}: {type(module).__name__}.{name} has {len(blocks)} blocks (1..{len(blocks)})"
        )
    first = f"{name}.{len(blocks) - n}."
    trainable, seen = [], False
    for pname, p in module.named_parameters():
        seen = seen or pname.startswith(first)
        p.requires_grad_(seen)
        if seen:
            trainable.append(pname)
    return trainable
