"""Spatial image tokens for the cross-attention (CoCa) decoder, and their cache for locked towers.

    locked EfficientNet-Lite0  last stage (head conv) 7x7x1280 map -> [B, 49, 1280]
    locked HF image tower / hf: CLIP or SigLIP vision model's last_hidden_state (ViT patch tokens)
    any other locked model      its ``image_features`` when they are a token list or a spatial map

A locked tower's tokens never change, so a training run computes them once per shard through the one
shard loop (:func:`clipforge.models.encode.encode_shards`, fed a :class:`TokenView` of the model) and
stores them as float16 safetensors, keyed like the train feature cache (train/cache.py): a directory
per identity of the frozen weights (:func:`clipforge.models.encode.fingerprint`, ``frozen_only``) and
one file per shard named by its URL, size and mtime. flickr8k train (6,000 images) is ~750 MB.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from clipforge.config import ConfigError
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.models import encode
from clipforge.utils import atomic_path

log = logging.getLogger(__name__)
SPATIAL_VERSION = 1


def check_spatial(model: Any) -> None:
    if not getattr(model, "image_locked", False):
        raise ConfigError(
            "caption condition 'spatial' needs a locked image tower for now (its tokens are cached once); "
            "use condition=embedding with a trained image tower"
        )


def _efficientnet_map(tower: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The locked EfficientNet tower's final map [B, 1280, h, w] (BN-folded prefix when it has one)."""
    if tower.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if tower.prefix_dtype == "bfloat16" else None
    with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype is not None):
        fused = tower._prefix_module() if hasattr(tower, "_prefix_module") else None
        if fused is not None:
            x, _ = fused(pixels, [])
        else:
            x = tower.net.stem(pixels)
            for u in tower.net.units:
                x = u(x)
    return x.float()


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2).contiguous() if x.ndim == 4 else x


@torch.no_grad()
def spatial_tokens(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels [B, 3, S, S] -> the locked image tower's spatial tokens [B, T, C] (float32).

    No train/eval switch: a locked tower always runs in eval mode (and switching the whole model here
    would undo the trainer's per-module modes mid-step)."""
    check_spatial(model)
    tower = getattr(model, "image_tower", None)
    if tower is not None and hasattr(tower, "net") and hasattr(tower, "n_frozen"):  # EfficientNet
        return _as_tokens(_efficientnet_map(tower, pixels))
    vision = getattr(tower, "model", None) if tower is not None else None
    if vision is None and hasattr(getattr(model, "hf", None), "vision_model"):
        vision = model.hf.vision_model  # hf: CLIP / SigLIP checkpoints
    if vision is not None:
        return _as_tokens(vision(pixel_values=pixels).last_hidden_state).float()
    feats = model.image_features(pixels)
    for name in ("tokens", "map"):
        if name in feats and feats[name].ndim in (3, 4):
            return _as_tokens(feats[name]).float()
    raise ConfigError(
        f"caption condition 'spatial': {type(model).__name__} exposes no spatial image tokens "
        f"(image_features gives {sorted(feats)})"
    )


class TokenView(nn.Module):
    """The model as the shard loop sees it, with ``image_features`` = its spatial tokens: lets
    :func:`~clipforge.models.encode.encode_shards` (``features=True``) produce tokens unchanged."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.preprocess = model.preprocess
        self.config = model.config
        self.training = bool(model.training)

    def train(self, mode: bool = True) -> TokenView:
        """The shard loop's eval()/train() must not reach the model (see :func:`spatial_tokens`)."""
        self.training = mode
        return self

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": spatial_tokens(self.inner, pixels)}


# -- the cache -------------------------------------------------------------------------------------
def cache_fingerprint(model: Any) -> str:
    """Directory key: format version + the one model identity over the frozen weights and config."""
    meta = {"v": SPATIAL_VERSION, "kind": "spatial", "model": encode.fingerprint(model, frozen_only=True)}
    return "spatial-" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def _shard_file(root: Path, url: str) -> Path:
    from clipforge.train.cache import _shard_file as feature_cache_file  # the same per-shard naming

    return feature_cache_file(root, url)


def _encode(
    model: Any, urls: list[str], *, batch_size: int, workers: int, progress: bool, desc: str,
    prepare: Any = None, fields: tuple[str, ...] = (), decode: Any = None, report: BadSampleReport | None = None,
) -> tuple[list[str], torch.Tensor, dict[str, list[Any]]]:  # fmt: skip
    """(keys, fp16 tokens [N, T, C], extra fields) of every decodable image of ``urls``."""
    from clipforge.data.decode import DecodeConfig

    keys: list[str] = []
    parts: list[torch.Tensor] = []
    extra: dict[str, list[Any]] = {}
    stream = encode.encode_shards(
        TokenView(model), urls, prepare=prepare, fields=fields, decode=decode or DecodeConfig(image=True),
        batch_size=batch_size, workers=workers, features=True, report=report,
    )  # fmt: skip
    for b in tqdm(stream, desc=desc, unit="batch", disable=not progress):
        if not len(b):
            continue
        keys += b.keys
        parts.append(b.features["tokens"].to(torch.float16))
        for k, v in b.fields.items():
            extra.setdefault(k, []).extend(v.tolist() if isinstance(v, torch.Tensor) else list(v))
    tokens = torch.cat(parts) if parts else torch.zeros(0, 0, 0, dtype=torch.float16)
    return keys, tokens, extra


def _save(path: Path, keys: list[str], tokens: torch.Tensor, bad: dict[str, Any]) -> None:
    meta = {"keys": json.dumps(keys), "bad": json.dumps(bad)}
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=meta)


def _load(path: Path) -> tuple[list[str], torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return json.loads(meta["keys"]), f.get_tensor("tokens")


def load_or_build_spatial_cache(
    model: Any,
    urls: list[str],
    cache_root: str | Path,
    *,
    batch_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[str], torch.Tensor, Path]:
    """(keys, float16 tokens [N, T, C], cache dir) of every sample of ``urls``: computed for shards not
    cached yet, read for the rest. The global RNG is left as it was (the DataLoader draws a seed), so
    a run's contrastive side trains exactly as without the cache pass."""
    from clipforge.train.cache import clean_stale_tmp

    check_spatial(model)
    root = Path(cache_root) / cache_fingerprint(model)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root)
    missing = [u for u in urls if not _shard_file(root, u).exists()]
    log.info("spatial token cache %s: %d/%d shards cached", root, len(urls) - len(missing), len(urls))
    with torch.random.fork_rng(devices=[]):
        for url in missing:  # one shard at a time: memory stays one shard's tokens
            report = BadSampleReport()
            keys, tokens, _ = _encode(model, [url], batch_size=batch_size, workers=workers,
                                      progress=progress, desc="cache tokens", report=report)  # fmt: skip
            _save(_shard_file(root, url), keys, tokens, report.to_dict())
    keys, parts = [], []
    for url in urls:
        k, t = _load(_shard_file(root, url))
        if k:
            keys += k
            parts.append(t)
    if not parts:
        raise ValueError(f"no usable samples in {len(urls)} shard(s) for the spatial token cache")
    return keys, torch.cat(parts), root


def align(want: list[str], keys: list[str], tokens: torch.Tensor) -> torch.Tensor:
    """Rows of ``tokens`` (row i for ``keys[i]``) in the order of ``want``; every key must be there."""
    pos = {k: i for i, k in enumerate(keys)}
    missing = [k for k in want if k not in pos]
    if missing:
        raise ValueError(f"{len(missing)} samples have no spatial tokens, e.g. {missing[0]!r}")
    idx = torch.tensor([pos[k] for k in want], dtype=torch.long)
    return tokens if idx.equal(torch.arange(len(keys))) else tokens.index_select(0, idx)


# -- conditions for captioning (caption run / eval, the server) --------------------------------------
def shard_spatial_conditions(
    model: Any,
    shards: str | list[str],
    *,
    batch_size: int = 64,
    workers: int = 1,
    precision: str = "fp32",
    prepare: Any = None,
    fields: tuple[str, ...] = ("captions",),
    decode: Any = None,
    progress: bool = False,
) -> Any:
    """:class:`~clipforge.caption.features.Conditions` whose ``cond`` is float16 tokens [N, T, C]: what
    ``features.shard_conditions`` gives for the other condition kinds (same keys, fields, bad report)."""
    from clipforge.caption.features import Conditions
    from clipforge.data.decode import DecodeConfig

    del precision  # the locked tower's own prefix dtype applies
    check_spatial(model)
    if decode is None:
        decode = DecodeConfig(image=True, caption="captions" in fields or "caption" in fields)
    report = BadSampleReport()
    keys, tokens, extra = _encode(
        model, expand_shards(shards), batch_size=batch_size, workers=workers, progress=progress,
        desc="tokens", prepare=prepare, fields=fields, decode=decode, report=report,
    )  # fmt: skip
    if not keys:
        raise ValueError(f"no decodable images in {shards}: {report.summary()}")
    captions = extra.pop("captions", [[] for _ in keys])
    return Conditions(keys, tokens, captions, report, extra)


@torch.inference_mode()
def image_spatial_conditions(model: Any, images: list[Any], batch: int = 32) -> torch.Tensor:
    """Tokens [N, T, C] of PIL images (the model's eval preprocessing, as in the shard loop)."""
    dev = encode.model_device(model)
    out = []
    for s in range(0, len(images), batch):
        px = torch.stack([model.preprocess(im) for im in images[s : s + batch]]).to(dev)
        out.append(spatial_tokens(model, px).cpu())
    return torch.cat(out)


def token_shape(model: Any) -> tuple[int, int]:
    """(tokens per image, token width) of ``model``'s spatial tokens, from one blank image."""
    from clipforge.data.transforms import PreprocessConfig

    size = PreprocessConfig.from_dict(model.config.preprocess).size
    dev = encode.model_device(model)
    t = spatial_tokens(model, torch.zeros(1, 3, size, size, device=dev))
    return int(t.shape[1]), int(t.shape[2])


# -- training sets (``caption train --condition spatial``) --------------------------------------------
def spatial_training_set(
    model: Any,
    shards: str | list[str],
    *,
    cache_root: str | Path | None,
    workers: int = 1,
    progress: bool = True,
) -> Any:
    """:class:`~clipforge.caption.features.TrainingSet` whose ``cond.cond`` is float16 tokens [N, T, C].

    With ``cache_root``: keys, captions and bad samples from the locked-tower feature cache, tokens from
    the spatial token cache (both built on first use, then read); without: one pass in memory."""
    from clipforge.caption.features import Conditions, TrainingSet, training_set

    urls = expand_shards(shards)
    if cache_root is None:
        return TrainingSet(shard_spatial_conditions(model, urls, workers=workers, progress=progress))
    base = training_set(model, urls, "features", text=False, cache_root=cache_root, workers=workers,
                        progress=progress).cond  # fmt: skip
    keys, tokens, root = load_or_build_spatial_cache(
        model, urls, cache_root, workers=workers, progress=progress
    )
    cond = Conditions(base.keys, align(base.keys, keys, tokens), base.captions, base.bad, base.fields)
    return TrainingSet(cond, cache_dir=str(root))
