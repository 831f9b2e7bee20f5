"""Any HF ``AutoModel`` vision checkpoint (ViT, DINOv2, CLIPVision, ConvNeXt...) as an image tower.

Locked (unlock=0): the prefix is the whole model, output pooled (``pooler_output`` when the model has
one, else the mean of ``last_hidden_state`` tokens) -> cacheable ``{"pooled": [B, H]}``. Fully
trainable (unlock=-1): pixels pass through. Partly unlocked (unlock=N): the last N blocks of the
model's block stack and what follows them train (models/unlock.py); pixels pass through (streamed).
Preprocessing comes from the checkpoint's ``preprocessor_config.json`` when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from clipforge.models.tower_text import load_hf_auto_model
from clipforge.models.unlock import unlock_last_blocks


def preprocess_from_hf_dir(path: str | Path, default_size: int = 224) -> dict:
    """PreprocessConfig fields from a HF image processor config (size, mean, std, resize mode)."""
    from clipforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    out = {"size": default_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"}
    f = Path(path) / "preprocessor_config.json"
    if not f.is_file():
        return out
    cfg = json.loads(f.read_text())
    size = cfg.get("crop_size") or cfg.get("size") or default_size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_size
    out["size"] = int(size)
    if cfg.get("image_mean"):
        out["mean"] = tuple(float(v) for v in cfg["image_mean"])
    if cfg.get("image_std"):
        out["std"] = tuple(float(v) for v in cfg["image_std"])
    out["interpolation"] = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(cfg.get("resample", 3), "bicubic")
    if not cfg.get("do_center_crop", True):
        out["resize_mode"] = "squash"
    return out


class HFImageTower(nn.Module):
    def __init__(
        self, path: str | Path | None, unlock: int = 0, pool: str = "mean", hf_config: dict | None = None
    ) -> None:
        super().__init__()
        if unlock < -1:
            raise ValueError("HF image towers take unlock=-1 (all), 0 (locked) or N > 0 (last N blocks)")
        if pool not in ("mean", "tokens"):
            raise ValueError(f"HF image tower: unknown pool {pool!r} (mean | tokens)")
        model = load_hf_auto_model(path, hf_config)
        self.model = getattr(model, "vision_model", model)  # a CLIP/SigLIP dir: use its vision side
        self.unlock, self.pool = unlock, pool
        cfg = self.model.config
        self.out_dim = int(getattr(cfg, "hidden_size", 0) or cfg.hidden_sizes[-1])
        if unlock == 0:
            self.model.requires_grad_(False)
        elif unlock > 0:
            unlock_last_blocks(self.model, unlock)
        self.model.train(unlock != 0)

    @property
    def locked(self) -> bool:
        return self.unlock == 0

    def train(self, mode: bool = True) -> HFImageTower:
        super().train(mode)
        if self.locked:
            self.model.eval()
        return self

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        if self.pool == "tokens":
            return hidden if hidden.dim() == 3 else hidden.flatten(2).transpose(1, 2)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return hidden.mean(1) if hidden.dim() == 3 else hidden.mean((2, 3))

    def prefix(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.locked:
            return {"pixels": pixels}
        with torch.no_grad():
            return {"tokens" if self.pool == "tokens" else "pooled": self._forward(pixels)}

    def rest(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if "pixels" in feats:
            return self._forward(feats["pixels"])
        return feats.get("pooled", feats.get("tokens"))
