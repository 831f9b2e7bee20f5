"""Projection heads that join a tower to the shared embedding space.

- ``linear``: one matrix (LiT / classic CLIP projection).
- ``mlp``: Linear -> GELU -> Dropout -> Linear (a little capacity on top of a locked tower).
- ``attn`` (image only): one learned query attends over the spatial feature map (CLIP/SigLIP-style
  attention pooling), so the head sees *where* things are instead of a global average.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("linear", "mlp", "attn", "multiscale")


class MLPHead(nn.Module):
    def __init__(self, din: int, dout: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or max(din, dout)
        self.fc1 = nn.Linear(din, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class AttnPoolHead(nn.Module):
    """Attention pooling over tokens ``[B, N, din]`` with one learned query, then a projection."""

    def __init__(self, din: int, dout: int, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        while din % heads:
            heads //= 2
        self.query = nn.Parameter(torch.randn(1, 1, din) * din**-0.5)
        self.norm = nn.LayerNorm(din)
        self.attn = nn.MultiheadAttention(din, heads, dropout=dropout, batch_first=True)
        self.proj = nn.Linear(din, dout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens)
        q = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attn(q, kv, kv, need_weights=False)
        return self.proj(pooled[:, 0])


def make_head(kind: str, din: int, dout: int, dropout: float = 0.0) -> nn.Module:
    """``linear`` | ``mlp`` | ``attn`` (``multiscale`` = linear over concatenated pooled stages)."""
    if kind in ("linear", "multiscale"):
        return nn.Linear(din, dout, bias=False)
    if kind == "mlp":
        return MLPHead(din, dout, dropout=dropout)
    if kind == "attn":
        return AttnPoolHead(din, dout, dropout=dropout)
    raise ValueError(f"unknown head type {kind!r}; choose from {', '.join(HEAD_TYPES)}")
