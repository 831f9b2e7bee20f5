"""``towers:IMAGE+TEXT``: a pretrained image tower and a pretrained text tower joined by heads (LiT).

Spec syntax (each side is a named tower or ``hf-image=DIR`` / ``hf-text=DIR`` for any HF AutoModel):

    towers:efficientnet-lite0+minilm-l6
    towers:hf-image=/ckpt/dinov2-small+minilm-l6
    towers:efficientnet-lite0+hf-text=/ckpt/bert-mini

Options (``load_model`` kwargs / ``--model-opt``, stored in ``ModelConfig.options``): see
:data:`OPTIONS`; an unknown one is an error (models/factory.py checks them against it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from clipforge.models.base import ClipModel, Features, ModelConfig
from clipforge.models.heads import make_head
from clipforge.models.spec import ModelSpec, parse_spec, side_path
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
    "semantic_prior": None,
}
OPTIONS: dict[str, str] = {
    "embed_dim": "shared embedding size (512)",
    "image_head": "linear | mlp | attn | multiscale",
    "text_head": "linear | mlp",
    "head_dropout": "dropout inside mlp/attn heads (0.0)",
    "unlock_image": "0 locked, -1 fully trainable, N the last N blocks",
    "unlock_text": "0 locked, -1 fully trainable, N the last N layers",
    "image_size": "input size (224; 160/192 trade accuracy for speed)",
    "freeze_bn": "keep BN statistics of unlocked blocks fixed (True)",
    "prefix_dtype": "float32 | bfloat16 for the frozen convnet prefix",
    "context_length": "max caption tokens (77)",
    "loss": "clip | siglip: SigLIP's logit scale/bias init",
    "init_logit_scale": "initial log logit scale",
    "init_logit_bias": "initial logit bias (SigLIP)",
    "semantic_prior": "None | imagenet: the frozen classifier's class probabilities, as text, added "
    "to the image embedding",
    "semantic_prior_scale": "initial, learnable weight of the semantic prior (30)",
}
_POOL_FOR_HEAD = {"linear": "mean", "mlp": "mean", "attn": "tokens", "multiscale": "multiscale"}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (first WordNet lemma each), in classifier order."""
    from importlib.resources import files

    text = (files("clipforge.models") / "data" / "imagenet_classes.txt").read_text()
    return [line.split(",")[0].strip() for line in text.splitlines() if line and not line.startswith("#")]


def build_config(spec: ModelSpec | str, **options: Any) -> ModelConfig:
    spec = parse_spec(spec)
    if spec.backend != "towers":
        raise ValueError(f"not a towers spec: {spec}")
    opts = {**DEFAULTS, **options}
    image, text = spec.image, spec.text
    opts["image_tower"], opts["text_tower"] = image, text
    loss = opts.pop("loss", "clip")
    scale = opts.pop("init_logit_scale", math.log(10) if loss == "siglip" else math.log(1 / 0.07))
    bias = opts.pop("init_logit_bias", -10.0 if loss == "siglip" else None)
    if image == "efficientnet-lite0":
        pre = PreprocessConfig(size=int(opts["image_size"]), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    elif image.startswith("hf-image="):
        from clipforge.models.tower_hf_image import preprocess_from_hf_dir

        pre = PreprocessConfig.from_dict(preprocess_from_hf_dir(side_path(image), int(opts["image_size"])))
    else:
        raise ValueError(f"unknown image tower {image!r}; choose from {', '.join(IMAGE_TOWERS)}")
    if text != "minilm-l6" and not text.startswith("hf-text="):
        raise ValueError(f"unknown text tower {text!r}; choose from {', '.join(TEXT_TOWERS)}")
    return ModelConfig(
        backend="towers",
        spec=str(spec),
        embed_dim=int(opts["embed_dim"]),
        init_logit_scale=float(scale),
        init_logit_bias=None if bias is None else float(bias),
        preprocess=pre.to_dict(),
        context_length=int(opts["context_length"]),
        options=opts,
    )


def build(config: ModelConfig, tokenizer: Tokenizer | None = None, pretrained: bool = True) -> TowersModel:
    return TowersModel(config, tokenizer=tokenizer, pretrained=pretrained)


class TowersModel(ClipModel):
    """Image tower -> image head; text tower -> text head; both into ``embed_dim``."""

    def __init__(
        self, config: ModelConfig, tokenizer: Tokenizer | None = None, pretrained: bool = True
    ) -> None:
        super().__init__(config)
        o = config.options
        image_pool = _POOL_FOR_HEAD.get(o["image_head"])
        if image_pool is None:
            raise ValueError(f"unknown image_head {o['image_head']!r}: linear | mlp | attn | multiscale")
        if o["text_head"] not in ("linear", "mlp"):
            raise ValueError(f"unknown text_head {o['text_head']!r}: linear | mlp")
        # (construction order = random-init order of the seeded build: towers, then heads)
        self.image_tower = self._image_tower(o, image_pool, pretrained)
        self.text_tower, text_path = self._text_tower(o, tokenizer, pretrained)
        d = config.embed_dim
        drop = float(o.get("head_dropout", 0.0))
        self.image_proj = make_head(o["image_head"], self.image_tower.out_dim, d, drop)
        self.text_proj = make_head(o["text_head"], self.text_tower.out_dim, d, drop)
        self.tokenizer = tokenizer or Tokenizer.from_dir(text_path, context_length=config.context_length)
        self.prior = o.get("semantic_prior")
        if self.prior:
            self._init_semantic_prior(o, image_pool, pretrained)
        self.train(False)

    @staticmethod
    def _image_tower(o: dict[str, Any], image_pool: str, pretrained: bool) -> nn.Module:
        """EfficientNet-Lite0 or any HF vision model (a skeleton from the saved HF config when rebuilding)."""
        if o["image_tower"] == "efficientnet-lite0":
            from clipforge.models.tower_efficientnet import EfficientNetTower

            return EfficientNetTower(
                pretrained=pretrained,
                unlock=int(o["unlock_image"]),
                pool=image_pool,
                freeze_bn=bool(o["freeze_bn"]),
                prefix_dtype=o["prefix_dtype"],
                keep_classifier=bool(o.get("semantic_prior")),
            )
        from clipforge.models.tower_hf_image import HFImageTower

        if image_pool == "multiscale":
            raise ValueError("image_head=multiscale needs the efficientnet-lite0 tower")
        pool = "tokens" if image_pool == "tokens" else "mean"
        path = side_path(o["image_tower"]) if pretrained else None
        hf_cfg = None if pretrained else o.get("image_hf_config")
        tower = HFImageTower(path, int(o["unlock_image"]), pool, hf_cfg)
        o["image_hf_config"] = tower.model.config.to_dict()
        return tower

    @staticmethod
    def _text_tower(
        o: dict[str, Any], tokenizer: Tokenizer | None, pretrained: bool
    ) -> tuple[nn.Module, Any]:
        """(MiniLM or any HF text model, its dir); a saved model rebuilds from its own config + tokenizer
        (the original dir may be gone)."""
        from clipforge.models.tower_text import HFTextTower, resolve_text_path

        text = o["text_tower"]
        text_path = resolve_text_path(side_path(text) or text) if (pretrained or tokenizer is None) else None
        tower = HFTextTower(
            text_path if pretrained else None,
            int(o["unlock_text"]),
            "mean",
            None if pretrained else o.get("text_hf_config"),
        )
        o["text_hf_config"] = tower.model.config.to_dict()
        return tower, text_path

    def _init_semantic_prior(self, o: dict[str, Any], image_pool: str, pretrained: bool) -> None:
        """ImageNet semantic prior: the frozen classifier's class probabilities, as text.

        The image embedding gets a second term, ``prior_scale * text_proj(p @ class_text)``: ``p`` is
        the softmax of the (frozen) ImageNet classifier on the pooled image features and
        ``class_text`` the unit-norm text-tower embeddings of "a photo of a {class}". The term lives in
        the text tower's space from step 0 and goes through the same trainable text projection, so
        what the image tower already *names* (a tabby, an airliner, a sorrel) lands near captions
        and prompts that say it. It lifts zero-shot transfer and retrieval when the paired data are
        small (see the quickstart's recipe notes).
        """
        if self.prior != "imagenet":
            raise ValueError(f"unknown semantic_prior {self.prior!r} (imagenet)")
        if o["image_tower"] != "efficientnet-lite0" or image_pool not in ("mean", "multiscale"):
            raise ValueError(
                "semantic_prior=imagenet needs the efficientnet-lite0 tower with a linear/mlp/multiscale head"
            )
        self.register_buffer("prior_text", torch.zeros(1000, self.text_tower.out_dim))
        self.prior_scale = nn.Parameter(torch.tensor(float(o.get("semantic_prior_scale", 30.0))))
        if pretrained:
            names = imagenet_class_names()
            with torch.no_grad():
                embs = [
                    self.text_tower._full(self.tokenizer([f"a photo of a {n}." for n in names[i : i + 250]]))
                    for i in range(0, len(names), 250)
                ]
            self.prior_text.copy_(F.normalize(torch.cat(embs), dim=-1))

    def image_features(self, pixels) -> Features:
        return self.image_tower.prefix(pixels)

    def image_head(self, feats: Features):
        pooled = self.image_tower.rest(feats)  # [B, 1280] (mean) or [B, 1904] (multiscale, head conv last)
        z = self.image_proj(pooled)
        if self.prior:
            probs = torch.softmax(self.image_tower.classifier(pooled[:, -1280:]), dim=-1)  # [B, 1000]
            z = z + self.prior_scale * self.text_proj(probs @ self.prior_text)
        return z

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
