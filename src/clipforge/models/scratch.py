"""``scratch:NAME``: named CLIP layouts trained from random init, on transformers' CLIP modules.

Why transformers' modules rather than our own: benchmarks/bench_models.py (``--only scratch``) times
a ViT-B/32 CLIP forward+backward at batch 8 on 2 CPU cores: ``CLIPModel`` (SDPA attention) 0.36
samples/s vs 0.39 for a compact pre-LN transformer of our own (fused QKV + SDPA), measured once on a
heavily shared machine: within noise. So we reuse the tested HF code (and get gradient
checkpointing and HF export for free). The tokenizer is MiniLM's uncased
WordPiece (vocab 30522, offline); [SEP] (id 102) ends a caption and is the pooled position.

Options: :data:`OPTIONS`. ``activation`` is ``gelu`` (open_clip's default for these layouts, one fused
op) or ``quick_gelu`` (OpenAI's CLIP and transformers' default, three elementwise ops).
"""

from __future__ import annotations

import math
from typing import Any

from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, PreprocessConfig
from clipforge.models.spec import ModelSpec, parse_spec
from clipforge.models.types import ModelConfig

# name: (image size, patch, vision width, layers, heads, text width, layers, heads, embed dim)
CONFIGS: dict[str, tuple[int, ...]] = {
    "vit-nano": (64, 16, 64, 2, 2, 64, 2, 2, 64),  # for tests: a few ms per step
    "vit-tiny": (224, 32, 192, 6, 3, 256, 4, 4, 256),
    "vit-s-32": (224, 32, 384, 12, 6, 384, 6, 6, 384),
    "vit-s-16": (224, 16, 384, 12, 6, 384, 6, 6, 384),
    "vit-b-32": (224, 32, 768, 12, 12, 512, 12, 8, 512),
    "vit-b-16": (224, 16, 768, 12, 12, 512, 12, 8, 512),
}
OPTIONS: dict[str, str] = {
    "image_size": "input size (the layout's, e.g. 224)",
    "context_length": "max caption tokens (77)",
    "embed_dim": "shared embedding size (the layout's)",
    "loss": "clip | siglip: SigLIP's logit scale/bias init",
    "activation": "gelu (default) | quick_gelu",
    "init_logit_scale": "initial log logit scale",
    "init_logit_bias": "initial logit bias (SigLIP)",
}
MINILM_VOCAB, PAD_ID, CLS_ID, SEP_ID = 30522, 0, 101, 102


def hf_clip_config(name: str, **options: Any):
    from transformers import CLIPConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown scratch model {name!r}; choose from {', '.join(CONFIGS)}")
    size, patch, vw, vl, vh, tw, tl, th, dim = CONFIGS[name]
    size = int(options.get("image_size") or size)
    dim = int(options.get("embed_dim") or dim)
    ctx = int(options.get("context_length") or 77)
    act = str(options.get("activation") or "gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"activation must be gelu or quick_gelu, got {act!r}")
    scale = options.get(
        "init_logit_scale", math.log(10) if options.get("loss") == "siglip" else math.log(1 / 0.07)
    )
    return CLIPConfig(
        text_config={
            "vocab_size": MINILM_VOCAB,
            "hidden_size": tw,
            "intermediate_size": 4 * tw,
            "num_hidden_layers": tl,
            "num_attention_heads": th,
            "max_position_embeddings": ctx,
            "pad_token_id": PAD_ID,
            "bos_token_id": CLS_ID,
            "eos_token_id": SEP_ID,
            "hidden_act": act,
        },
        vision_config={
            "hidden_size": vw,
            "intermediate_size": 4 * vw,
            "num_hidden_layers": vl,
            "num_attention_heads": vh,
            "image_size": size,
            "patch_size": patch,
            "hidden_act": act,
        },
        projection_dim=dim,
        logit_scale_init_value=float(scale),
    )


def build_config(spec: ModelSpec | str, **options: Any) -> ModelConfig:
    spec = parse_spec(spec)
    if spec.backend != "scratch":
        raise ValueError(f"not a scratch spec: {spec}")
    name = spec.target
    hf_cfg = hf_clip_config(name, **options)
    siglip = options.get("loss") == "siglip"
    opts = {
        **{k: v for k, v in options.items() if k not in ("init_logit_scale", "init_logit_bias")},
        "name": name,
        "model_type": "clip",
        "hf_config": hf_cfg.to_dict(),
        "unlock_image": -1,
        "unlock_text": -1,
    }
    return ModelConfig(
        backend="scratch",
        spec=f"scratch:{name}",
        embed_dim=int(hf_cfg.projection_dim),
        init_logit_scale=float(hf_cfg.logit_scale_init_value),
        init_logit_bias=float(options.get("init_logit_bias", -10.0)) if siglip else None,
        preprocess=PreprocessConfig(
            size=int(hf_cfg.vision_config.image_size), mean=CLIP_MEAN, std=CLIP_STD
        ).to_dict(),
        context_length=int(hf_cfg.text_config.max_position_embeddings),
        options=opts,
    )


def build(config: ModelConfig, tokenizer=None, pretrained: bool = True):
    """A random-init model (also the skeleton ``load_saved`` fills from model.safetensors)."""
    from clipforge.models.hf import HFClipModel
    from clipforge.models.tokenizer import Tokenizer

    tokenizer = tokenizer or Tokenizer.minilm(context_length=config.context_length)
    return HFClipModel(config, tokenizer=tokenizer, pretrained=False)
