"""``towers:IMAGE+TEXT``: a pretrained image tower and a pretrained text tower joined by heads (LiT).

Spec syntax (each side is a named tower or ``hf-image=DIR`` / ``hf-text=DIR`` for any HF AutoModel):

    towers:efficientnet-lite0+minilm-l6
    towers:hf-image=/ckpt/dinov2-small+minilm-l6
    towers:efficientnet-lite0+hf-text=/ckpt/bert-mini

Options (``load_model`` kwargs, stored in ``ModelConfig.options``): ``embed_dim`` (512),
``image_head`` (linear | mlp | attn | multiscale), ``text_head`` (linear | mlp), ``head_dropout``,
``unlock_image`` / ``unlock_text`` (0 locked, -1 fully trainable, N last N blocks/layers),
``image_size`` (224; 160/192 trade accuracy for speed), ``freeze_bn`` (True), ``prefix_dtype``
(float32 | bfloat16 for the frozen convnet prefix), ``context_length`` (77), ``loss`` (clip | siglip:
sets SigLIP's logit scale/bias init), ``init_logit_scale``, ``init_logit_bias``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from clipforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from clipforge.models.base import ClipModel, Features, ModelConfig
from clipforge.models.heads import make_head
from clipforge.models.tokenizer import Tokenizer

IMAGE_TOWERS = ("efficientnet-lite0", "hf-image=DIR")
TEXT_TOWERS = ("minilm-l6", "hf-text=DIR")
DEFAULTS: dict[str, Any] = {
    "embed_dim": 512,
    "image_head": "linear",
    "text_head": "linear",
    "head_dropout": 0.0,
    "unlock_image": 0,
    "unlock_text": 0,
    "image_size": 224,
    "freeze_bn": True,
    "prefix_dtype": "float32",
    "context_length": 77,
}
_POOL_FOR_HEAD = {"linear": "mean", "mlp": "mean", "attn": "tokens", "multiscale": "multiscale"}


def parse_spec(spec: str) -> tuple[str, str]:
    body = spec.split(":", 1)[1] if spec.startswith("towers:") else spec
    if "+" not in body:
        raise ValueError(
            f"towers spec needs IMAGE+TEXT, got {spec!r} (e.g. towers:efficientnet-lite0+minilm-l6)"
        )
    if "+hf-text=" in body:
        image, text = body.split("+hf-text=", 1)
        text = "hf-text=" + text
    else:
        image, text = body.rsplit("+", 1)
    return image, text


def build_config(spec: str, **options: Any) -> ModelConfig:
    opts = {**DEFAULTS, **options}
    image, text = parse_spec(spec)
    opts["image_tower"], opts["text_tower"] = image, text
    loss = opts.pop("loss", "clip")
    scale = opts.pop("init_logit_scale", math.log(10) if loss == "siglip" else math.log(1 / 0.07))
    bias = opts.pop("init_logit_bias", -10.0 if loss == "siglip" else None)
    if image == "efficientnet-lite0":
        pre = PreprocessConfig(size=int(opts["image_size"]), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif image.startswith("hf-image="):
        from clipforge.models.tower_hf_image import preprocess_from_hf_dir

        pre = PreprocessConfig.from_dict(
            preprocess_from_hf_dir(image.split("=", 1)[1], int(opts["image_size"]))
        )
    else:
        raise ValueError(f"unknown image tower {image!r}; choose from {', '.join(IMAGE_TOWERS)}")
    if text != "minilm-l6" and not text.startswith("hf-text="):
        raise ValueError(f"unknown text tower {text!r}; choose from {', '.join(TEXT_TOWERS)}")
    return ModelConfig(
        backend="towers",
        spec=f"towers:{image}+{text}",
        embed_dim=int(opts["embed_dim"]),
        init_logit_scale=float(scale),
        init_logit_bias=None if bias is None else float(bias),
        preprocess=pre.to_dict(),
        context_length=int(opts["context_length"]),
        options=opts,
    )


class TowersModel(ClipModel):
    """Image tower -> image head; text tower -> text head; both into ``embed_dim``."""

    def __init__(
        self, config: ModelConfig, tokenizer: Tokenizer | None = None, pretrained: bool = True
    ) -> None:
        super().__init__(config)
        o = config.options
        image, text = o["image_tower"], o["text_tower"]
        image_pool = _POOL_FOR_HEAD.get(o["image_head"])
        if image_pool is None:
            raise ValueError(f"unknown image_head {o['image_head']!r}: linear | mlp | attn | multiscale")
        if o["text_head"] not in ("linear", "mlp"):
            raise ValueError(f"unknown text_head {o['text_head']!r}: linear | mlp")
        if image == "efficientnet-lite0":
            from clipforge.models.tower_efficientnet import EfficientNetTower

            self.image_tower: nn.Module = EfficientNetTower(
                pretrained=pretrained,
                unlock=int(o["unlock_image"]),
                pool=image_pool,
                freeze_bn=bool(o["freeze_bn"]),
                prefix_dtype=o["prefix_dtype"],
            )
        else:
            from clipforge.models.tower_hf_image import HFImageTower

            pool = "tokens" if image_pool == "tokens" else "mean"
            if image_pool == "multiscale":
                raise ValueError("image_head=multiscale needs the efficientnet-lite0 tower")
            path = None if not pretrained else image.split("=", 1)[1]
            hf_cfg = None if pretrained else o.get("image_hf_config")
            self.image_tower = HFImageTower(path, int(o["unlock_image"]), pool, hf_cfg)
            o["image_hf_config"] = self.image_tower.model.config.to_dict()
        from clipforge.models.tower_text import HFTextTower, resolve_text_path

        text_name = text.split("=", 1)[1] if text.startswith("hf-text=") else text
        # A saved model rebuilds from its own config + tokenizer: the original dir may be gone.
        text_path = resolve_text_path(text_name) if (pretrained or tokenizer is None) else None
        self.text_tower = HFTextTower(
            text_path if pretrained else None,
            int(o["unlock_text"]),
            "mean",
            None if pretrained else o.get("text_hf_config"),
        )
        o["text_hf_config"] = self.text_tower.model.config.to_dict()
        d = config.embed_dim
        drop = float(o.get("head_dropout", 0.0))
        self.image_proj = make_head(o["image_head"], self.image_tower.out_dim, d, drop)
        self.text_proj = make_head(o["text_head"], self.text_tower.out_dim, d, drop)
        self.tokenizer = tokenizer or Tokenizer.from_dir(text_path, context_length=config.context_length)
        self.train(False)

    def image_features(self, pixels) -> Features:
        return self.image_tower.prefix(pixels)

    def image_head(self, feats: Features):
        return self.image_proj(self.image_tower.rest(feats))

    def text_features(self, tokens) -> Features:
        return self.text_tower.prefix(tokens)

    def text_head(self, feats: Features):
        return self.text_proj(self.text_tower.rest(feats))

    @property
    def image_locked(self) -> bool:
        return self.image_tower.locked

    @property
    def text_locked(self) -> bool:
        return self.text_tower.locked
