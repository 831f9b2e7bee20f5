"""open_clip's CoCa checkpoints (``openclip:DIR`` with a ``multimodal_cfg``): embed and caption.

The modules mirror open_clip 3.3.0's, parameter name for parameter name, so a checkpoint loads as it
is (``strict``) and gives open_clip's numbers (benchmarks/openclip_parity.py, 1e-5):

    visual        ViT; attentional pooler (learned queries over ``ln_k``-normed patch tokens, its own
                  ``ln_q``), then ``ln_post``; query 0 is the contrastive token (``@ proj`` -> the
                  image embedding), queries 1.. the caption tokens the decoder cross-attends to.
                  Without the pooler (``coca_base``): ``ln_post``, class token / patch tokens.
    text          causal text transformer with an appended CLS token (``embed_cls``): the embedding
                  is ``ln_final(x[:, -1]) @ text_projection``; the per-token outputs (no ``ln_final``)
                  feed the decoder. The key mask from pads is open_clip's as its models were trained:
                  shifted by one (``correct_cls_mask=False``; key j is masked when token j-1 is pad).
    text_decoder  per layer a causal self-attention block then a cross-attention block
                  (``ln_1_kv`` on the image tokens), packed ``in_proj`` weights, optional LayerScale;
                  its own ``ln_final`` and an untied ``text_projection`` to the vocabulary.

Captioning goes through the caption stage's one decoding implementation
(:mod:`clipforge.caption.decoding`): :class:`CocaDecoder` is a decoder object with the same
``start``/``step`` interface as :class:`clipforge.caption.decoder.CaptionDecoder`, KV-cached through
both the text tower and the multimodal decoder (the causal text tower makes a token's output
independent of later tokens, so one new token per step gives open_clip's full-recompute numbers), the
image keys/values computed once per image in ``start`` (``KVCache.cross``).

Not mapped (a clear error names them): HF or timm towers, ``attentional_pool`` as 'parallel' /
'cascade' (open_clip marks it untested), ``pool_type='none'``, custom attention blocks (qk-norm,
scaled cosine, ...), ``no_causal_mask``, text ``proj_bias`` / ``proj_type='none'``, norm/act kwargs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.base import ClipModel, Features
from clipforge.models.types import ModelConfig

_VISION = {
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 16,
    "image_size": 224,
    "ls_init_value": None,
    "attentional_pool": False,
    "attn_pooler_queries": 256,
    "attn_pooler_heads": 8,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "pool_type": "tok",
}
_TEXT = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
    "mlp_ratio": 4.0,
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": 0,
    "eos_id": 2,
    "pool_type": "argmax",
}
_MULTIMODAL = {"context_length": 77, "width": 512, "heads": 8, "layers": 12, "ls_init_value": None}
# options that change the architecture away from what this module builds (value = the one accepted)
_BLOCK_OPTIONS = {  # residual-block variants open_clip offers to both towers
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "norm_kwargs": None,
    "act_kwargs": None,
}
_UNMAPPED = {
    "vision": {"timm_model_name": None, **_BLOCK_OPTIONS},
    "text": {
        "hf_model_name": None,
        "no_causal_mask": False,
        "proj_bias": False,
        "proj_type": "linear",
        **_BLOCK_OPTIONS,
    },
    "multimodal": {"hf_model_name": None},
}


def check_coca(model_cfg: dict) -> None:
    """Raise naming every option of a CoCa ``model_cfg`` this module does not build."""
    bad = []
    for where in ("vision", "text", "multimodal"):
        cfg = model_cfg.get(f"{where}_cfg") or {}
        for key, ok in _UNMAPPED[where].items():
            if (
                key in cfg
                and cfg[key] not in (ok, None, {})
                and not (key == "block_type" and cfg[key] == "default")
            ):
                bad.append(f"{where}_cfg.{key}={cfg[key]!r}")
    v = {**_VISION, **(model_cfg.get("vision_cfg") or {})}
    if isinstance(v["layers"], (list, tuple)):
        bad.append("vision_cfg.layers as a list (ModifiedResNet)")
    if v["attentional_pool"] not in (True, False):
        bad.append(f"vision_cfg.attentional_pool={v['attentional_pool']!r} (True | False map)")
    if v["pool_type"] not in ("tok", "avg"):
        bad.append(f"vision_cfg.pool_type={v['pool_type']!r} (tok | avg map)")
    if not isinstance(model_cfg.get("embed_dim"), int):
        bad.append("embed_dim (an integer is needed)")
    t = {**_TEXT, **(model_cfg.get("text_cfg") or {})}
    if not t["embed_cls"] and t["pool_type"] not in ("argmax", "eos", "first", "last"):
        bad.append(f"text_cfg.pool_type={t['pool_type']!r}")
    m = {**_MULTIMODAL, **(model_cfg.get("multimodal_cfg") or {})}
    token_dim = int(model_cfg.get("embed_dim", 0)) if v["attentional_pool"] else int(v["width"])
    if int(m["width"]) != token_dim:
        bad.append(f"multimodal_cfg.width={m['width']} != the image tokens' width {token_dim}")
    if int(m["width"]) != int(t["width"]):
        bad.append(f"multimodal_cfg.width={m['width']} != text_cfg.width={t['width']}")
    if bad:
        raise ValueError(
            "open_clip CoCa layout does not map onto clipforge's CoCa modules: " + ", ".join(bad)
        )


# -- modules (open_clip's parameter names) ---------------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """``nn.MultiheadAttention``'s tensors (packed ``in_proj_weight``, or separate q/k/v weights when
    the keys have another width), computed with SDPA so keys/values can be cached."""

    def __init__(self, dim: int, heads: int, kdim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        kdim = kdim or dim
        self.packed = kdim == dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def _w(self, i: int) -> torch.Tensor:
        if self.packed:
            return self.in_proj_weight.chunk(3)[i]
        return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[i]

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        b, t, w = z.shape
        return z.view(b, t, self.heads, w // self.heads).transpose(1, 2)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(F.linear(x, self._w(0), self.in_proj_bias.chunk(3)[0]))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.in_proj_bias.chunk(3)
        return self._split(F.linear(x, self._w(1), bias[1])), self._split(F.linear(x, self._w(2), bias[2]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        b, _, t, _ = q.shape
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(att.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.attend(self.q(x), *self.kv(x if kv is None else kv), mask)


class Block(nn.Module):
    """open_clip's ``ResidualAttentionBlock``: pre-LN attention (self, or cross with ``ln_1_kv``) + MLP."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, ls: float | None, act: type, cross: bool = False
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls) if ls is not None else nn.Identity()
        if cross:
            self.ln_1_kv = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]
            )
        )
        self.ls_2 = LayerScale(width, ls) if ls is not None else nn.Identity()

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._mlp(x + self.ls_1(self.attn(self.ln_1(x), mask=mask)))

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens -> this cross block's (keys, values): once per image when decoding."""
        return self.attn.kv(self.ln_1_kv(memory))

    def cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._mlp(x + self.ls_1(self.attn.attend(self.attn.q(self.ln_1(x)), *kv)))

    def cached(self, x: torch.Tensor, cache: Any, layer: int) -> torch.Tensor:
        """One new position per row, its keys/values appended to ``cache`` (it sees every earlier one)."""
        h = self.ln_1(x)
        k, v = cache.update(layer, *self.attn.kv(h))
        return self._mlp(x + self.ls_1(self.attn.attend(self.attn.q(h), k, v)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, ls: float | None, act: type):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio, ls, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, mask)
        return x


class AttentionalPooler(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = Attention(dim, heads, kdim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, kv=self.ln_k(x))


class Visual(nn.Module):
    def __init__(self, v: dict, embed_dim: int, act: type) -> None:
        super().__init__()
        size, patch, width = _pair(v["image_size"]), _pair(v["patch_size"]), int(v["width"])
        grid = (size[0] // patch[0]) * (size[1] // patch[1])
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid + 1, width))
        self.ln_pre = nn.Identity() if v["no_ln_pre"] else nn.LayerNorm(width)
        heads = width // int(v["head_width"])
        self.transformer = Transformer(
            width, int(v["layers"]), heads, float(v["mlp_ratio"]), v["ls_init_value"], act
        )
        self.pool_type = v["pool_type"]
        self.final_ln_after_pool = bool(v["final_ln_after_pool"])
        if v["attentional_pool"]:
            self.attn_pool = AttentionalPooler(
                embed_dim, width, int(v["attn_pooler_heads"]), int(v["attn_pooler_queries"])
            )
            pool_dim = embed_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.ln_post = nn.LayerNorm(pool_dim)
        self.proj = nn.Parameter(torch.zeros(pool_dim, embed_dim))

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(1), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def trunk(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels -> (pooled, before ``proj``; caption tokens [B, T, D]), open_clip's ``_pool``."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        if self.attn_pool is not None:  # the original open_clip CoCa: pool, then ln_post
            return self._global_pool(self.ln_post(self.attn_pool(x)))
        if self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            return self.ln_post(pooled), tokens
        return self._global_pool(self.ln_post(x))


class Text(nn.Module):
    def __init__(self, t: dict, embed_dim: int, act: type) -> None:
        super().__init__()
        width = int(t["width"])
        self.context_length = int(t["context_length"])
        self.pad_id, self.eos_id, self.pool_type = int(t["pad_id"]), int(t["eos_id"]), t["pool_type"]
        self.token_embedding = nn.Embedding(int(t["vocab_size"]), width)
        self.cls_emb = nn.Parameter(torch.zeros(width)) if t["embed_cls"] else None
        self.positional_embedding = nn.Parameter(
            torch.zeros(self.context_length + bool(t["embed_cls"]), width)
        )
        self.transformer = Transformer(
            width, int(t["layers"]), int(t["heads"]), float(t["mlp_ratio"]), t["ls_init_value"], act
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))

    def _mask(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """[B, 1, n, n] bool (True: attend): causal, and with a CLS token the pad keys masked, shifted
        by one as open_clip does (``correct_cls_mask=False``, the mask its CoCa weights were trained with)."""
        mask = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        if self.cls_emb is None:
            return mask
        valid = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids != self.pad_id], 1)
        return mask.unsqueeze(0).unsqueeze(0) & valid[:, None, None, :]

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] -> (pooled, before ``text_projection``; per-token outputs [B, L, W] for the decoder)."""
        if ids.shape[1] > self.context_length:
            raise ValueError(f"{ids.shape[1]} tokens > the text tower's context length {self.context_length}")
        x = self.token_embedding(ids)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)], 1)
        n = x.shape[1]
        x = self.transformer(x + self.positional_embedding[:n].to(x.dtype), self._mask(ids, n))
        if self.cls_emb is not None:  # CLS last, final LN after pooling; tokens without it
            return self.ln_final(x[:, -1]), x[:, :-1]
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "argmax":
            pooled = x[rows, ids.argmax(-1)]
        elif self.pool_type == "eos":
            pooled = x[rows, (ids == self.eos_id).int().argmax(-1)]
        else:
            pooled = x[:, 0] if self.pool_type == "first" else x[:, -1]
        return pooled, x

    def step(self, ids: torch.Tensor, pos: int, cache: Any) -> torch.Tensor:
        """One new token per row at position ``pos`` -> its output [B, 1, W] (what :meth:`forward`
        gives at that position: a causal tower, and decoding never feeds pads to a live row)."""
        x = self.token_embedding(ids.view(-1, 1)) + self.positional_embedding[pos]
        for i, blk in enumerate(self.transformer.resblocks):
            x = blk.cached(x, cache, i)
        return x if self.cls_emb is not None else self.ln_final(x)


class MultimodalDecoder(nn.Module):
    def __init__(self, m: dict, vocab_size: int, act: type) -> None:
        super().__init__()
        width, layers, heads = int(m["width"]), int(m["layers"]), int(m["heads"])
        ratio, ls = 4.0, m["ls_init_value"]  # open_clip 3.3.0 never passes multimodal_cfg.mlp_ratio on
        self.context_length = int(m["context_length"])
        self.resblocks = nn.ModuleList(Block(width, heads, ratio, ls, act) for _ in range(layers))
        self.cross_attn = nn.ModuleList(
            Block(width, heads, ratio, ls, act, cross=True) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, vocab_size))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, L, V] (open_clip's ``MultimodalTransformer.forward``)."""
        n = text_tokens.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens > the decoder's context length {self.context_length}")
        mask = torch.ones(n, n, dtype=torch.bool, device=text_tokens.device).tril()
        x = text_tokens
        for blk, cross in zip(self.resblocks, self.cross_attn):
            x = cross.cross(blk(x, mask), cross.cross_kv(image_tokens))
        return self.ln_final(x) @ self.text_projection


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


# -- the decoder object for clipforge.caption.decoding ---------------------------------------------
@dataclass
class CocaDecoderConfig:
    max_len: int  # positions incl. BOS (decoding caps its max_len at this - 1)
    vocab_size: int
    cond_dim: int  # width of the image tokens it reads (as CaptionDecoder's cfg names it)


class CocaDecoder(nn.Module):
    """The text tower + multimodal decoder as :mod:`clipforge.caption.decoding` drives a decoder:
    ``start(image_tokens, bos)`` / ``step(tokens, cache)`` -> next-word logits [B, V]."""

    def __init__(self, text: Text, decoder: MultimodalDecoder) -> None:
        super().__init__()
        self.text, self.decoder = text, decoder
        max_len = min(text.context_length, decoder.context_length)
        w, vocab = decoder.text_projection.shape
        self.cfg = CocaDecoderConfig(max_len=max_len, vocab_size=int(vocab), cond_dim=int(w))

    def _cache(self) -> Any:
        from clipforge.caption.decoder import KVCache

        return KVCache(len(self.text.transformer.resblocks) + len(self.decoder.resblocks))

    def _logits(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        pos = cache.length
        if pos >= self.cfg.max_len:
            raise ValueError(f"decoding past {self.cfg.max_len} positions (the checkpoint's context length)")
        x = self.text.step(ids, pos, cache)
        off = len(self.text.transformer.resblocks)
        for i, (blk, cross) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn)):
            x = cross.cross(blk.cached(x, cache, off + i), cache.cross[i])
        return (self.decoder.ln_final(x) @ self.decoder.text_projection)[:, -1]

    def start(self, cond: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, Any]:
        """Image tokens [B, T, D] -> (logits of the first word after BOS, the cache holding every
        cross block's image keys/values: computed here, once per image)."""
        if cond.ndim != 3:
            raise ValueError(f"a CoCa decoder reads image tokens [B, T, D], got {tuple(cond.shape)}")
        dtype = self.decoder.text_projection.dtype
        cache = self._cache()
        cache.cross = [cross.cross_kv(cond.to(dtype)) for cross in self.decoder.cross_attn]
        bos = torch.full((cond.shape[0],), bos_id, dtype=torch.long, device=cond.device)
        return self._logits(bos, cache), cache

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        return self._logits(tokens, cache)

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, L, V] where ``logits[:, i]`` predicts ``tokens[:, i + 1]``."""
        return self.decoder(cond, self.text(tokens)[1])


# -- the clipforge model ---------------------------------------------------------------------------
class OpenClipCocaModel(ClipModel):
    """An open_clip CoCa checkpoint behind clipforge's model interface, with ``caption_decoder`` (a
    :class:`CocaDecoder`) and ``caption_tokens(pixels)`` (what it cross-attends to)."""

    def __init__(self, config: ModelConfig, tokenizer: Any) -> None:
        super().__init__(config)
        o = config.options
        cfg = o["open_clip_cfg"]
        act = QuickGELU if cfg.get("quick_gelu") else nn.GELU
        embed = int(cfg["embed_dim"])
        v = {**_VISION, **(cfg.get("vision_cfg") or {})}
        t = {**_TEXT, **(cfg.get("text_cfg") or {})}
        m = {**_MULTIMODAL, **(cfg.get("multimodal_cfg") or {})}
        self.visual = Visual(v, embed, act)
        self.text = Text(t, embed, act)
        self.text_decoder = MultimodalDecoder(m, int(t["vocab_size"]), act)
        self.tokenizer = tokenizer
        self.unlock_image, self.unlock_text = int(o.get("unlock_image", -1)), int(o.get("unlock_text", -1))
        for which, unlock, tower in (
            ("image", self.unlock_image, self.visual),
            ("text", self.unlock_text, self.text),
        ):
            if unlock == 0:
                tower.requires_grad_(False)
            elif unlock != -1:
                raise ValueError(f"openclip CoCa: unlock_{which} must be -1 (all) or 0 (locked)")
        from clipforge.caption.openclip_coca import OpenClipCocaCaptioner

        self.captioner = OpenClipCocaCaptioner(self)  # model.caption(images); saved as part of the weights
        self.train(False)

    @property
    def pad_token_id(self) -> int:
        return self.text.pad_id

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """open_clip's cleaning before the BPE: HTML entities unescaped (twice, as its tokenizer does) and
        whitespace collapsed; ftfy's mojibake repair is left out (not a dependency)."""
        import html

        texts = [texts] if isinstance(texts, str) else texts
        return self.tokenizer([" ".join(html.unescape(html.unescape(t)).split()) for t in texts])

    @property
    def caption_decoder(self) -> CocaDecoder:
        """A fresh decoder view over this model's own text tower and multimodal decoder (no copies)."""
        return CocaDecoder(self.text, self.text_decoder)

    @property
    def image_locked(self) -> bool:
        return self.unlock_image == 0

    @property
    def text_locked(self) -> bool:
        return self.unlock_text == 0

    def image_features(self, pixels: torch.Tensor) -> Features:
        if not self.image_locked:
            return {"pixels": pixels}
        with torch.no_grad():
            return {"pooled": self.visual.trunk(pixels)[0]}

    def image_head(self, feats: Features) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self.visual.trunk(feats["pixels"])[0]
        return x @ self.visual.proj

    def text_features(self, tokens: dict[str, torch.Tensor]) -> Features:
        if not self.text_locked:
            return dict(tokens)
        with torch.no_grad():
            return {"pooled": self.text(tokens["input_ids"])[0]}

    def text_head(self, feats: Features) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self.text(feats["input_ids"])[0]
        return x @ self.text.text_projection

    def caption_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels -> the image tokens [B, T, D] the multimodal decoder cross-attends to."""
        return self.visual.trunk(pixels)[1]

    def caption_logits(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """open_clip's ``model(image, text, output_labels=False)["logits"]``: [B, L, V]."""
        return self.text_decoder(self.caption_tokens(pixels), self.text(ids)[1])


# -- CLIP's BPE from the file open_clip ships (bpe_simple_vocab_16e6.txt.gz) -----------------------
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the BPE's base alphabet, in id order)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), 256),
    ]
    cs = list(bs)
    extra = [b for b in range(256) if b not in bs]  # control bytes etc.: mapped past 255, in order
    bs += extra
    cs += [256 + i for i in range(len(extra))]
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_bpe_tokenizer(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` -> CLIP's ``vocab.json`` + ``merges.txt`` (+ a
    ``tokenizer_config.json``) as transformers ships them: the 49,408 ids open_clip's own tokenizer
    gives (256 bytes, 256 bytes + ``</w>``, 48,894 merges, SOT 49406, EOT 49407)."""
    import gzip
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in lines if m.strip()]
    base = list(_bytes_to_unicode().values())
    vocab = [
        *base,
        *(b + "</w>" for b in base),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        **special,
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def _tokenizer(o: dict, context_length: int, pad: int) -> Any:
    """The model's tokenizer: a tokenizer dir (openclip.py's rule), else CLIP's BPE file beside the
    weights; padded to the context length with ``pad`` as open_clip does (the CLS position depends on it)."""
    import tempfile

    from clipforge.models.tokenizer import Tokenizer

    kw = {"context_length": context_length, "pad_to_max": True, "pad_token_id": pad}
    if o.get("tokenizer_dir"):
        return Tokenizer.from_dir(o["tokenizer_dir"], **kw)
    if o.get("bpe_file"):
        with tempfile.TemporaryDirectory() as tmp:
            return Tokenizer.from_dir(write_clip_bpe_tokenizer(o["bpe_file"], tmp), **kw)
    raise FileNotFoundError(
        f"no tokenizer for {o['path']}: put tokenizer.json (or CLIP's vocab.json + merges.txt, or open_clip's "
        f"{CLIP_BPE_FILE}) there, or set text_cfg.hf_tokenizer_name to a local dir"
    )


# -- backend glue (called by clipforge.models.openclip for configs with a multimodal_cfg) -----------
def build_config(spec: str, model_cfg: dict, pre_cfg: dict, weights: Path, d: Path | None, **options: Any):
    from clipforge.models.openclip import _tokenizer_dir, preprocess_from_openclip

    check_coca(model_cfg)
    v = {**_VISION, **(model_cfg.get("vision_cfg") or {})}
    t = {**_TEXT, **(model_cfg.get("text_cfg") or {})}
    pre = preprocess_from_openclip(pre_cfg, _pair(v["image_size"])[0])
    if pre.size != _pair(v["image_size"])[0]:
        raise ValueError(
            f"{spec}: preprocess_cfg.size {pre.size} != vision_cfg.image_size {v['image_size']} "
            "(the ViT's position embeddings fix the input size)"
        )
    bias = model_cfg.get("init_logit_bias")
    opts = {
        "unlock_image": -1,
        "unlock_text": -1,
        **options,
        "path": str(d or weights.parent),
        "weights": str(weights),
        "model_type": "coca",
        "tokenizer_dir": str(_tokenizer_dir(model_cfg, d or weights.parent) or ""),
        "bpe_file": str(bpe) if (bpe := (d or weights.parent) / CLIP_BPE_FILE).is_file() else "",
        "open_clip_cfg": model_cfg,
    }
    return ModelConfig(
        backend="openclip",
        spec=spec,
        embed_dim=int(model_cfg["embed_dim"]),
        init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=None if bias is None else float(bias),
        preprocess=pre.to_dict(),
        context_length=int(t["context_length"]),
        options=opts,
    )


def build(config: ModelConfig, tokenizer: Any = None, pretrained: bool = True) -> OpenClipCocaModel:
    """The CoCa model; ``pretrained``: the checkpoint's tensors, every one, by open_clip's names."""
    from clipforge.models.openclip import read_state_dict

    o = config.options
    check_coca(o["open_clip_cfg"])
    if tokenizer is None:
        pad = int({**_TEXT, **o["open_clip_cfg"].get("text_cfg", {})}["pad_id"])
        tokenizer = _tokenizer(o, config.context_length, pad)
    model = OpenClipCocaModel(config, tokenizer)
    if pretrained:
        load_openclip_weights(model, read_state_dict(o["weights"]), config.spec)
    return model.eval()


def load_openclip_weights(model: OpenClipCocaModel, sd: dict[str, torch.Tensor], where: str) -> None:
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    own = {
        k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("visual", "text", "text_decoder")
    }
    own.update({k: v for k, v in model.state_dict().items() if k in ("logit_scale", "logit_bias")})
    missing = sorted(set(own) - set(sd) - {"logit_bias"})
    unexpected = sorted(set(sd) - set(own))
    if "logit_bias" in sd and model.logit_bias is None:
        unexpected.append("logit_bias (the config has no init_logit_bias)")
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not fit open_clip_config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fits = {k: sd[k].shape == v.shape or sd[k].numel() == v.numel() == 1 for k, v in own.items() if k in sd}
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k, ok in fits.items() if not ok]
    if bad:
        raise ValueError(f"{where}: weights do not fit open_clip_config.json: {bad[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in sd:
                v.copy_(sd[k].reshape(v.shape).to(v.dtype))
