"""``hf:PATH_OR_ID``: transformers ``CLIPModel`` / ``SiglipModel`` checkpoints behind our interface.

Embeddings equal transformers' ``get_image_features`` / ``get_text_features`` (tests/models check it
to 1e-5). Tokenizer and preprocessing come from the checkpoint dir (``tokenizer.json`` or slow
tokenizer files; ``preprocessor_config.json``); logit scale/bias are copied from the checkpoint.

Options (:data:`OPTIONS`): ``unlock_image`` / ``unlock_text``: -1 (default, fine-tune everything), 0
(lock the tower; its pooled output is cached and only the projection trains — LiT on a CLIP
checkpoint) or N > 0 (the last N encoder layers and the final norm train; streamed, not cached).
A hub id works where a network exists (``from_pretrained`` downloads it); offline, pass a local dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, PreprocessConfig
from clipforge.models.base import ClipModel, Features, ModelConfig
from clipforge.models.spec import ModelSpec, parse_spec
from clipforge.models.tokenizer import Tokenizer
from clipforge.models.unlock import unlock_last_blocks

OPTIONS: dict[str, str] = {
    "unlock_image": "-1 fine-tune all (default), 0 locked (cached), N the last N layers",
    "unlock_text": "-1 fine-tune all (default), 0 locked (cached), N the last N layers",
    "context_length": "max caption tokens (default: the checkpoint's)",
}


def _hf_classes(model_type: str):
    import transformers

    if model_type.startswith("siglip"):
        return transformers.SiglipConfig, transformers.SiglipModel
    if model_type in ("clip", "clip_model"):
        return transformers.CLIPConfig, transformers.CLIPModel
    raise ValueError(f"hf backend supports CLIP and SigLIP checkpoints, not model_type={model_type!r}")


def _read_model_type(path: str) -> str:
    p = Path(path) / "config.json"
    if p.is_file():
        return json.loads(p.read_text()).get("model_type", "clip")
    from transformers import AutoConfig  # a hub id (needs a network)

    return AutoConfig.from_pretrained(path).model_type


def build_config(spec: ModelSpec | str, **options: Any) -> ModelConfig:
    spec = parse_spec(spec)
    if spec.backend != "hf":
        raise ValueError(f"not an hf spec: {spec}")
    path = spec.target
    model_type = _read_model_type(path)
    cfg_cls, _ = _hf_classes(model_type)
    hf_cfg = cfg_cls.from_pretrained(path)
    siglip = model_type.startswith("siglip")
    pre = _preprocess(path, hf_cfg, siglip)
    opts = {"unlock_image": -1, "unlock_text": -1, **options, "path": str(path), "model_type": model_type}
    return ModelConfig(
        backend="hf",
        spec=f"hf:{path}",
        embed_dim=int(getattr(hf_cfg, "projection_dim", 0) or hf_cfg.text_config.hidden_size),
        init_logit_bias=0.0 if siglip else None,  # real values are copied from the checkpoint
        preprocess=pre.to_dict(),
        context_length=int(opts.get("context_length") or hf_cfg.text_config.max_position_embeddings),
        options=opts,
    )


def _preprocess(path: str, hf_cfg, siglip: bool) -> PreprocessConfig:
    from clipforge.models.tower_hf_image import preprocess_from_hf_dir

    size = int(hf_cfg.vision_config.image_size)
    d = {
        "size": size,
        "mean": SIGLIP_MEAN if siglip else CLIP_MEAN,
        "std": SIGLIP_STD if siglip else CLIP_STD,
        "resize_mode": "squash" if siglip else "shortest",
    }
    if (Path(path) / "preprocessor_config.json").is_file():
        d.update(preprocess_from_hf_dir(path, size))
    return PreprocessConfig.from_dict(d)


def build(config: ModelConfig, tokenizer: Tokenizer | None = None, pretrained: bool = True) -> HFClipModel:
    return HFClipModel(config, tokenizer=tokenizer, pretrained=pretrained)


class HFClipModel(ClipModel):
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer | None = None,
        pretrained: bool = True,
        hf_model: nn.Module | None = None,
    ) -> None:
        super().__init__(config)
        o = config.options
        cfg_cls, model_cls = _hf_classes(o["model_type"])
        if hf_model is not None:
            self.hf = hf_model
        elif pretrained:
            self.hf = model_cls.from_pretrained(o["path"])
        else:
            d = dict(o["hf_config"])
            d.pop("model_type", None)
            self.hf = model_cls(cfg_cls(**d))
        o["hf_config"] = self.hf.config.to_dict()
        self.siglip = o["model_type"].startswith("siglip")
        with torch.no_grad():  # one logit scale/bias: ours (the checkpoint's values, frozen copies unused)
            self.logit_scale.copy_(self.hf.logit_scale.detach().float().reshape(()))
            if self.logit_bias is not None and getattr(self.hf, "logit_bias", None) is not None:
                self.logit_bias.copy_(self.hf.logit_bias.detach().float().reshape(()))
        for name in ("logit_scale", "logit_bias"):
            p = getattr(self.hf, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        self.unlock_image, self.unlock_text = int(o["unlock_image"]), int(o["unlock_text"])
        for which, unlock, tower in (
            ("image", self.unlock_image, self.hf.vision_model),
            ("text", self.unlock_text, self.hf.text_model),
        ):
            if unlock == 0:
                tower.requires_grad_(False)
            elif unlock > 0:
                unlock_last_blocks(tower, unlock)
            elif unlock != -1:
                raise ValueError(f"hf backend: unlock_{which} must be -1 (all), 0 (locked) or N > 0 layers")
        if tokenizer is None:
            path = o["path"]
            tokenizer = Tokenizer.from_dir(path, context_length=config.context_length, pad_to_max=self.siglip)
        self.tokenizer = tokenizer
        self.train(False)

    @property
    def image_locked(self) -> bool:
        return self.unlock_image == 0

    @property
    def text_locked(self) -> bool:
        return self.unlock_text == 0

    def train(self, mode: bool = True) -> HFClipModel:
        super().train(mode)
        if self.unlock_image == 0:
            self.hf.vision_model.eval()
        if self.unlock_text == 0:
            self.hf.text_model.eval()
        return self

    def _vision_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf.vision_model(pixel_values=pixels).pooler_output

    def _text_pooled(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.hf.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return out.pooler_output

    def image_features(self, pixels: torch.Tensor) -> Features:
        if not self.image_locked:
            return {"pixels": pixels}
        with torch.no_grad():
            return {"pooled": self._vision_pooled(pixels)}

    def image_head(self, feats: Features) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self._vision_pooled(feats["pixels"])
        return x if self.siglip else self.hf.visual_projection(x)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> Features:
        if not self.text_locked:
            return dict(tokens)
        with torch.no_grad():
            return {"pooled": self._text_pooled(tokens)}

    def text_head(self, feats: Features) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self._text_pooled(feats)
        return x if self.siglip else self.hf.text_projection(x)
