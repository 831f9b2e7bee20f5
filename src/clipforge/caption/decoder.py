"""ClipCap-style captioner: an embedding -> k learned prefix vectors -> a small causal transformer.

    cond [B, C] --MLP--> prefix [B, P, W] ; [prefix, BOS, w1 .. wn] --causal blocks--> next-word logits

With ``cross_dim > 0`` it is CoCa's multimodal decoder: the condition is a grid of image tokens
[B, T, C] (e.g. EfficientNet-Lite0's 7x7x1280 last stage, ViT patch tokens), projected to the width
(+ a learned position per token) and cross-attended to in every block; the prefix then reads the
tokens' mean. The cross-attention keys/values depend only on the image, so decoding computes them
once per image (:meth:`CaptionDecoder.start`) and keeps them in the :class:`KVCache`.

The condition is a CLIP embedding (or the pooled features of a frozen image tower); the decoder
never sees pixels, so training runs on cached vectors at CPU speed. The language head shares the
token-embedding matrix (``tie_embeddings``): fewer parameters and faster convergence on small
caption sets. Decoding uses a KV cache (:class:`KVCache`): the prefix and BOS are run once, then one
token per step (see :mod:`clipforge.caption.decoding`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from clipforge.config import ConfigError, from_dict, to_dict


@dataclass
class DecoderConfig:
    """Shape of the decoder; ``vocab_size`` and ``cond_dim`` come from the vocabulary and the encoder."""

    vocab_size: int = 0
    cond_dim: int = 512
    prefix_len: int = field(default=4, metadata={"help": "learned prefix vectors per condition"})
    width: int = field(default=256, metadata={"help": "decoder width"})
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    mlp_ratio: float = 4.0
    max_len: int = field(default=32, metadata={"help": "caption tokens incl. BOS/EOS"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in blocks and prefix"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share token embedding and LM head"})
    cond_norm: bool = field(default=True, metadata={"help": "LayerNorm the condition before the MLP"})
    cross_dim: int = field(
        default=0, metadata={"help": "width of the image tokens cross-attended to (0: off)"}
    )
    cross_tokens: int = field(
        default=0, metadata={"help": "image tokens per image (learned positions; 0: none)"}
    )
    cross_grid: int = field(
        default=0,
        metadata={
            "help": "average-pool a square token map (e.g. 7x7) to GRID x GRID before cross-attending: "
            "fewer keys, cheaper steps (0: the tokens as they are)"
        },
    )

    @property
    def cross(self) -> bool:
        return self.cross_dim > 0

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.cross_dim < 0 or self.cross_tokens < 0 or self.cross_grid < 0:
            raise ConfigError("DecoderConfig.cross_dim, cross_tokens and cross_grid must be >= 0")
        if self.cross and self.cond_dim != self.cross_dim:
            raise ConfigError(
                "a cross-attention decoder's prefix reads the mean token: cond_dim == cross_dim"
            )
        for name in ("prefix_len", "width", "layers", "heads", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DecoderConfig.{name} must be >= 1")


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Image tokens [B, T, C] of a square map (T = s * s) -> [B, grid * grid, C] by adaptive average
    pooling; ``grid`` 0 (or the map's own side): unchanged."""
    b, t, c = tokens.shape
    side = math.isqrt(t)
    if not grid:
        return tokens
    if side * side != t:
        raise ValueError(f"cross_grid {grid}: {t} image tokens are not a square map")
    if grid == side:
        return tokens
    x = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)


class KVCache:
    """Keys/values of every layer for the positions seen so far: [B, H, T, Dh] each; ``cross``: the
    cross-attention keys/values of the image tokens per layer ([B, H, M, Dh] pairs), computed once."""

    def __init__(self, layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[2])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def select(self, idx: torch.Tensor, cross: bool = True) -> None:
        """Keep/reorder batch rows (beam search: each beam continues from its parent's cache).

        ``cross=False``: leave the image keys/values as they are (a beam's parent is a beam of the
        same image, so they never change after the first expansion: no copy per step)."""
        self.k = [None if t is None else t.index_select(0, idx) for t in self.k]
        self.v = [None if t is None else t.index_select(0, idx) for t in self.v]
        if cross and self.cross is not None:
            self.cross = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cross]


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention (SDPA), cross-attention to the image tokens
    when ``cfg.cross`` (CoCa), a GELU MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.cross:
            self.ln_x = nn.LayerNorm(cfg.width)
            self.q_x = nn.Linear(cfg.width, cfg.width)
            self.kv_x = nn.Linear(cfg.width, 2 * cfg.width)
            self.proj_x = nn.Linear(cfg.width, cfg.width)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        b, t, w = z.shape
        return z.view(b, t, self.heads, w // self.heads).transpose(1, 2)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens [B, M, W] -> this block's cross-attention (keys, values), [B, H, M, Dh] each."""
        k, v = self.kv_x(memory).split(memory.shape[2], dim=2)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        past: int,
        mem: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=2)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if t == 1:
            att = F.scaled_dot_product_attention(q, k, v)  # one new position sees everything before it
        elif past == 0:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, w)))
        if mem is not None:  # every position (prefix included) sees every image token
            att = F.scaled_dot_product_attention(self._heads(self.q_x(self.ln_x(x))), *mem)
            x = x + self.drop(self.proj_x(att.transpose(1, 2).reshape(b, t, w)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 4:
            raise ConfigError("DecoderConfig.vocab_size must be set from the caption vocabulary")
        self.cfg = cfg
        w, p = cfg.width, cfg.prefix_len
        self.cond_norm = nn.LayerNorm(cfg.cond_dim) if cfg.cond_norm else nn.Identity()
        self.prefix_mlp = nn.Sequential(
            nn.Linear(cfg.cond_dim, w * max(p // 2, 1)), nn.GELU(), nn.Linear(w * max(p // 2, 1), w * p)
        )
        self.tok_emb = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(p + cfg.max_len, w))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(w)
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=False)
        if cfg.cross:  # image tokens -> decoder width (+ a learned position per token)
            self.mem_norm = nn.LayerNorm(cfg.cross_dim)
            self.mem_proj = nn.Linear(cfg.cross_dim, w)
            self.mem_pos = nn.Parameter(torch.zeros(cfg.cross_tokens, w)) if cfg.cross_tokens else None
        self.apply(self._init)
        nn.init.normal_(self.pos_embed, std=0.02)
        if cfg.cross and self.mem_pos is not None:
            nn.init.normal_(self.mem_pos, std=0.02)
        for n, prm in self.named_parameters():  # GPT-2: scale residual projections by depth
            if n.endswith("proj.weight") or n.endswith("proj_x.weight") or n.endswith("mlp.2.weight"):
                nn.init.normal_(prm, std=0.02 / math.sqrt(2 * cfg.layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_cond(self, cond: torch.Tensor) -> None:
        want = 3 if self.cfg.cross else 2
        if cond.ndim != want or cond.shape[-1] != self.cfg.cond_dim:
            shape = "[B, T, C]" if self.cfg.cross else "[B, C]"
            raise ValueError(
                f"the decoder reads {shape} conditions with C = {self.cfg.cond_dim}, got {tuple(cond.shape)}"
            )

    def prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """[B, C] (or image tokens [B, T, C]: their mean) -> [B, P, W]."""
        cond = cond.float()
        if cond.ndim == 3:
            cond = cond.mean(1)
        z = self.prefix_mlp(self.cond_norm(cond))
        return z.view(cond.shape[0], self.cfg.prefix_len, self.cfg.width)

    def memory(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Image tokens [B, T, C] -> every block's cross-attention (keys, values); None without cross."""
        if not self.cfg.cross:
            return None
        m = self.mem_proj(self.mem_norm(pool_grid(cond.float(), self.cfg.cross_grid)))
        if self.mem_pos is not None:
            if m.shape[1] != self.mem_pos.shape[0]:
                raise ValueError(
                    f"{m.shape[1]} image tokens, the decoder was built for {self.mem_pos.shape[0]}"
                )
            m = m + self.mem_pos
        m = self.drop(m)
        return [blk.cross_kv(m) for blk in self.blocks]

    def _run(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache | None,
        mem: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        x = self.drop(x + self.pos_embed[start : start + x.shape[1]])
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i, start, None if mem is None else mem[i])
        return self.lm_head(self.ln_f(x))

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, L, V] where ``logits[:, i]`` predicts ``tokens[:, i + 1]``."""
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"captions of {tokens.shape[1]} tokens > max_len {self.cfg.max_len}")
        self._check_cond(cond)
        x = torch.cat([self.prefix(cond), self.tok_emb(tokens)], dim=1)
        return self._run(x, 0, None, self.memory(cond))[:, self.cfg.prefix_len :]

    def start(self, cond: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, KVCache]:
        """Run prefix + BOS once: (logits of the first word [B, V], the filled cache, which also holds
        the image tokens' cross-attention keys/values: computed here, once per image)."""
        self._check_cond(cond)
        cache = KVCache(self.cfg.layers)
        cache.cross = self.memory(cond)
        bos = torch.full((cond.shape[0], 1), bos_id, dtype=torch.long, device=cond.device)
        x = torch.cat([self.prefix(cond), self.tok_emb(bos)], dim=1)
        return self._run(x, 0, cache, cache.cross)[:, -1], cache

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row [B] -> logits of the next [B, V]; the cache grows by one position."""
        pos = cache.length
        if pos >= self.pos_embed.shape[0]:
            raise ValueError(f"decoding past max_len {self.cfg.max_len}")
        return self._run(self.tok_emb(tokens.view(-1, 1)), pos, cache, cache.cross)[:, -1]


# -- persistence: config.json + model.safetensors, written into a temp dir and renamed -----------------


def save_decoder(
    directory: str | Path,
    model: CaptionDecoder,
    extra: dict[str, Any] | None = None,
    files: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` (decoder config + ``extra``) and ``model.safetensors`` atomically.

    ``files``: more files for the same dir, ``name -> callable(path)`` (the vocabulary, a memory).
    An existing ``directory`` is replaced only once the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        cfg = {"decoder": to_dict(model.cfg), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, write in (files or {}).items():
            write(tmp / name)
        os.chmod(tmp, 0o755)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_decoder(directory: str | Path) -> tuple[CaptionDecoder, dict[str, Any]]:
    """(decoder in eval mode, the rest of config.json)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} is not a saved captioner (config.json + model.safetensors)")
    cfg = json.loads(path.read_text())
    model = CaptionDecoder(from_dict(DecoderConfig, cfg.pop("decoder"), "decoder"))
    load_model(model, str(directory / "model.safetensors"), strict=True)
    return model.eval(), cfg
