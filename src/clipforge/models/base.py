"""The one model interface every backend implements (towers, HF CLIP/SigLIP, scratch configs).

Embeddings are computed in two parts so frozen work can be cached (LiT-style locked towers):

    pixels  --image_features-->  trunk features  --image_head-->  embedding  (--normalize--> unit)
    tokens  --text_features--->  trunk features  --text_head--->  embedding

``*_features`` runs the *frozen prefix* of a tower (the whole tower when locked, all but the last N
blocks when partly unlocked, nothing when fully trainable); ``*_head`` runs everything trainable.
Features are a dict of tensors with a leading batch dim so a cache can store and re-batch them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.models.io import save_model
from clipforge.models.types import Features, ModelConfig, read_config

__all__ = ["ClipModel", "Features", "ModelConfig", "read_config"]


class ClipModel(nn.Module):
    """Base class. Subclasses set ``self.tokenizer`` and implement the four feature/head methods."""

    config: ModelConfig
    tokenizer: (
        Any  # callable: list[str] -> {"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]}
    )

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias)))
            if config.init_logit_bias is not None
            else None
        )
        pcfg = PreprocessConfig.from_dict(config.preprocess)
        self.preprocess = ImageTransform(pcfg, train=False)
        self.preprocess_train = ImageTransform(pcfg, train=True)

    # -- to implement -------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> Features:
        """Frozen prefix of the image tower. pixels: [B, 3, H, W] -> dict of [B, ...] tensors."""
        return {"pixels": pixels}

    def image_head(self, feats: Features) -> torch.Tensor:
        """Trainable rest of the image side -> unnormalized embedding [B, D]."""
        raise NotImplementedError

    def text_features(self, tokens: dict[str, torch.Tensor]) -> Features:
        """Frozen prefix of the text tower. tokens: input_ids/attention_mask [B, L] -> dict of [B, ...]."""
        return dict(tokens)

    def text_head(self, feats: Features) -> torch.Tensor:
        """Trainable rest of the text side -> unnormalized embedding [B, D]."""
        raise NotImplementedError

    @property
    def image_locked(self) -> bool:
        """True when image_features has no trainable parameters (its output can be cached)."""
        return False

    @property
    def text_locked(self) -> bool:
        return False

    # -- the interface ------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_head(self.image_features(pixels))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: dict[str, torch.Tensor] | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            tokens = {"input_ids": tokens, "attention_mask": (tokens != self.pad_token_id).long()}
        x = self.text_head(self.text_features(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    @property
    def pad_token_id(self) -> int:
        return int(getattr(self.tokenizer, "pad_token_id", 0) or 0)

    def forward(
        self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (image_emb [B, D], text_emb [B, D], logit_scale.exp() clamped at 100, logit_bias)."""
        return (
            self.encode_image(pixels),
            self.encode_text(tokens),
            self.logit_scale.exp().clamp(max=100.0),
            self.logit_bias,
        )

    # -- captioning (a model trained with --loss coca) ---------------------------------------
    def caption(self, images: list[Any], options: Any = None) -> list[str]:
        """PIL images -> one caption each, through the CoCa decoder saved with this model.

        ``options``: a :class:`clipforge.caption.decoding.DecodeOptions` (default: its defaults).
        """
        captioner = getattr(self, "captioner", None)
        if captioner is None:
            raise ValueError(f"model {self.config.spec} has no captioner (train it with --loss coca)")
        from clipforge.caption.decoding import DecodeOptions

        return captioner.caption_images(self, list(images), options or DecodeOptions())

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) atomically into ``directory``.

        Load it back with ``clipforge.models.load_model(directory)``.
        """
        return save_model(self, directory)

    def describe(self) -> dict[str, Any]:
        n_all = sum(p.numel() for p in self.parameters())
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "spec": self.config.spec,
            "params": n_all,
            "trainable": n_train,
            "embed_dim": self.config.embed_dim,
        }
