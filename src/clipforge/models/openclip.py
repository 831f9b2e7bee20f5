"""``openclip:DIR`` / ``openclip:NAME=FILE``: open_clip ViT checkpoints, run on transformers' CLIP modules.

open_clip's native ViT CLIP (``visual`` VisionTransformer + causal text Transformer) is, tensor for
tensor, transformers' ``CLIPModel``: fused ``in_proj`` = q/k/v stacked, ``proj`` = the projection
transposed, class token pooled after ``ln_post``, text pooled at the EOT token. So a checkpoint is
converted once at load (:func:`openclip_to_hf`) and runs in :class:`~clipforge.models.hf.HFClipModel`
(training, caching, saving and the ``hf`` export then come for free); :func:`hf_to_openclip` is the
way back, used by ``clipforge export --format openclip``.

Accepted: a hub-layout dir (``open_clip_config.json`` with ``model_cfg`` + ``preprocess_cfg``, and
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, the latter read with
``torch.load(weights_only=True)``), or a bare state dict with a named config (:data:`NAMED`), e.g.
``openclip:ViT-B-32=/ckpt/model.safetensors``. Any width/depth/patch/size, GELU or QuickGELU, text
pooled at argmax (CLIP BPE) or at ``eos_id``, ``init_logit_bias`` (SigLIP-style loss). Layouts that
do not map (timm or HF text towers, attentional pooling, LayerScale, avg pooling) are refused
with the option that does not map. Parity against open_clip itself: benchmarks/openclip_parity.py.
A config with a ``multimodal_cfg`` is open_clip's CoCa: it is built by
:mod:`clipforge.models.openclip_coca` (open_clip's own modules and names; it embeds and captions).

Tokenizer: ``tokenizer.json`` in DIR (``clipforge export`` writes one), else the local dir named by
``text_cfg.hf_tokenizer_name``, else vocab.json + merges.txt in DIR (CLIP BPE, as HF ships it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, PreprocessConfig
from clipforge.models.registry import Backend, register_backend
from clipforge.models.spec import ModelSpec, parse_spec
from clipforge.models.types import ModelConfig

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPTIONS: dict[str, str] = {
    "unlock_image": "-1 fine-tune all (default), 0 locked (cached), N the last N layers",
    "unlock_text": "-1 fine-tune all (default), 0 locked (cached), N the last N layers",
}
_VISION_DEFAULTS = {
    "layers": 12,
    "width": 768,
    "head_width": 64,
    "mlp_ratio": 4.0,
    "patch_size": 16,
    "image_size": 224,
}
_TEXT_DEFAULTS = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
    "mlp_ratio": 4.0,
    "pool_type": "argmax",
    "eos_id": 2,
    "pad_id": 0,
}


def _named(embed: int, size: int, patch: int, vw: int, vl: int, tw: int, th: int, tl: int) -> dict:
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": size, "layers": vl, "width": vw, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": tw, "heads": th, "layers": tl},
    }


# open_clip's model_configs/*.json for the common ViT layouts (for ``openclip:NAME=FILE``)
NAMED: dict[str, dict] = {
    "ViT-B-32": _named(512, 224, 32, 768, 12, 512, 8, 12),
    "ViT-B-16": _named(512, 224, 16, 768, 12, 512, 8, 12),
    "ViT-L-14": _named(768, 224, 14, 1024, 24, 768, 12, 12),
    "ViT-L-14-336": _named(768, 336, 14, 1024, 24, 768, 12, 12),
}
for _n in list(NAMED):
    NAMED[f"{_n}-quickgelu"] = {**NAMED[_n], "quick_gelu": True}


def _coca(embed: int, vw: int, vl: int, patch: int, tw: int, th: int, pool_heads: int) -> dict:
    text = {"context_length": 76, "vocab_size": 49408, "width": tw, "heads": th, "layers": 12}
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": 224, "layers": vl, "width": vw, "patch_size": patch,
                       "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {**text, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**text, "attn_pooler_heads": pool_heads},
        "custom_text": True,
    }  # fmt: skip


# open_clip's model_configs/coca_ViT-*.json (CoCa: clipforge.models.openclip_coca)
NAMED["coca_ViT-B-32"] = _coca(512, 768, 12, 32, 512, 8, 8)
NAMED["coca_ViT-L-14"] = _coca(768, 1024, 24, 14, 768, 12, 12)

# options of model_cfg / vision_cfg / text_cfg whose value changes the architecture away from CLIPModel's
_UNMAPPED = {
    "model": {"multimodal_cfg": None},
    "vision": {
        "timm_model_name": None,
        "attentional_pool": False,
        "ls_init_value": None,
        "no_ln_pre": False,
        "pool_type": "tok",
        "final_ln_after_pool": False,
        "proj_bias": False,
        "pos_embed_type": "learnable",
        "layers_per_stage": None,
        "norm_kwargs": {},
        "act_kwargs": {},
        "output_tokens": False,
    },
    "text": {
        "hf_model_name": None,
        "ls_init_value": None,
        "embed_cls": False,
        "no_causal_mask": False,
        "final_ln_after_pool": False,
        "proj_type": "linear",
        "proj_bias": False,
        "norm_kwargs": {},
        "act_kwargs": {},
        "output_tokens": False,
    },
}


# -- config ---------------------------------------------------------------------------------------
def check_mappable(model_cfg: dict) -> None:
    """Raise naming every option of ``model_cfg`` that transformers' CLIPModel cannot represent."""
    bad = []
    for where, cfg in (
        ("model", model_cfg),
        ("vision", model_cfg.get("vision_cfg", {})),
        ("text", model_cfg.get("text_cfg", {})),
    ):
        for key, ok in _UNMAPPED[where].items():
            if cfg.get(key) not in (ok, None):
                bad.append(f"{key}={cfg[key]!r}" if where == "model" else f"{where}_cfg.{key}={cfg[key]!r}")
    text = model_cfg.get("text_cfg", {})
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        bad.append(f"text_cfg.pool_type={text['pool_type']!r} (argmax | eos map)")
    if text.get("pool_type") == "eos" and int(text.get("eos_id", 2)) == 2:
        bad.append("text_cfg.pool_type='eos' with eos_id=2 (transformers reads eos id 2 as argmax pooling)")
    if bad:
        raise ValueError(
            "open_clip layout does not map onto the ViT CLIP clipforge runs (transformers CLIPModel): "
            + ", ".join(bad)
        )


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def _square(v: Any) -> int:
    vals = _as_list(v)
    if vals[0] != vals[1]:
        raise ValueError(f"non-square size {v!r} does not map")
    return int(vals[0])


def hf_config_from_openclip(model_cfg: dict):
    """open_clip ``model_cfg`` -> transformers ``CLIPConfig`` (after :func:`check_mappable`)."""
    from transformers import CLIPConfig

    if not isinstance(model_cfg.get("embed_dim"), int):
        raise ValueError("open_clip model_cfg needs an integer embed_dim")
    check_mappable(model_cfg)
    v = {**_VISION_DEFAULTS, **model_cfg.get("vision_cfg", {})}
    t = {**_TEXT_DEFAULTS, **model_cfg.get("text_cfg", {})}
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vw, tw = int(v["width"]), int(t["width"])
    eos = 2 if t["pool_type"] == "argmax" else int(t["eos_id"])
    return CLIPConfig(
        text_config={
            "vocab_size": int(t["vocab_size"]),
            "hidden_size": tw,
            "intermediate_size": int(tw * float(t["mlp_ratio"])),
            "num_hidden_layers": int(t["layers"]),
            "num_attention_heads": int(t["heads"]),
            "max_position_embeddings": int(t["context_length"]),
            "pad_token_id": int(t.get("pad_id", 0)),
            "eos_token_id": eos,
            "bos_token_id": 49406 if int(t["vocab_size"]) > 49406 else eos,  # (unused by CLIPModel)
            "hidden_act": act,
        },
        vision_config={
            "hidden_size": vw,
            "intermediate_size": int(vw * float(v["mlp_ratio"])),
            "num_hidden_layers": int(v["layers"]),
            "num_attention_heads": vw // int(v["head_width"]),
            "image_size": _square(v["image_size"]),
            "patch_size": _square(v["patch_size"]),
            "hidden_act": act,
        },
        projection_dim=int(model_cfg["embed_dim"]),
        logit_scale_init_value=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
    )


def openclip_config_from_hf(hf_cfg, logit_bias: float | None = None) -> dict:
    """transformers ``CLIPConfig`` -> open_clip ``model_cfg`` (the inverse of :func:`hf_config_from_openclip`)."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ValueError(
            f"activations {sorted(acts)} do not map onto open_clip (gelu or quick_gelu, both towers)"
        )
    for name, eps in (("vision", v.layer_norm_eps), ("text", t.layer_norm_eps)):
        if abs(float(eps) - 1e-5) > 1e-12:
            raise ValueError(f"{name} layer_norm_eps={eps} does not map (open_clip's LayerNorm uses 1e-5)")
    if v.hidden_size % v.num_attention_heads:
        raise ValueError("vision width not divisible by its heads")
    eos = int(t.eos_token_id) if t.eos_token_id is not None else 2
    cfg: dict[str, Any] = {
        "embed_dim": int(hf_cfg.projection_dim),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {
            "image_size": int(v.image_size),
            "layers": int(v.num_hidden_layers),
            "width": int(v.hidden_size),
            "head_width": int(v.hidden_size // v.num_attention_heads),
            "mlp_ratio": float(v.intermediate_size) / float(v.hidden_size),
            "patch_size": int(v.patch_size),
        },
        "text_cfg": {
            "context_length": int(t.max_position_embeddings),
            "vocab_size": int(t.vocab_size),
            "width": int(t.hidden_size),
            "heads": int(t.num_attention_heads),
            "layers": int(t.num_hidden_layers),
            "mlp_ratio": float(t.intermediate_size) / float(t.hidden_size),
            "pad_id": int(t.pad_token_id or 0),
            **({"pool_type": "argmax"} if eos == 2 else {"pool_type": "eos", "eos_id": eos}),
        },
    }
    if logit_bias is not None:
        cfg["init_logit_bias"] = float(logit_bias)
    return cfg


def preprocess_from_openclip(pre: dict, image_size: int) -> PreprocessConfig:
    """open_clip ``preprocess_cfg`` (size, mean, std, interpolation, resize_mode) -> ours."""
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"preprocess_cfg.resize_mode={mode!r} is not supported (shortest | squash)")
    interp = pre.get("interpolation", "bicubic")
    if interp not in ("bicubic", "bilinear"):
        raise ValueError(f"preprocess_cfg.interpolation={interp!r} is not supported (bicubic | bilinear)")
    size = pre.get("size", image_size)
    return PreprocessConfig(
        size=_square(size),
        mean=tuple(float(x) for x in pre.get("mean", CLIP_MEAN)),
        std=tuple(float(x) for x in pre.get("std", CLIP_STD)),
        interpolation=interp,
        resize_mode=mode,
    )


def openclip_preprocess_cfg(pre: PreprocessConfig | dict) -> dict:
    p = PreprocessConfig.from_dict(pre) if isinstance(pre, dict) else pre
    return {
        "size": p.size,
        "mode": "RGB",
        "mean": list(p.mean),
        "std": list(p.std),
        "interpolation": p.interpolation,
        "resize_mode": p.resize_mode,
    }


# -- weights --------------------------------------------------------------------------------------
_BLOCK = {  # open_clip resblock -> transformers encoder layer (q/k/v split out of in_proj)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _tower_pairs(oc: str, hf: str) -> list[tuple[str, str]]:
    return [(f"{oc}.{a}", f"{hf}.{b}") for a, b in _BLOCK.items()]


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """open_clip state dict -> (transformers CLIPModel state dict, extras {logit_scale, logit_bias})."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):  # CustomTextCLIP: the text tower under "text."
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    extras = {k: sd[k] for k in ("logit_scale", "logit_bias") if k in sd}
    direct = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
    }
    used = set(extras) | {"attn_mask", "visual.attn_mask"}
    for a, b in direct.items():
        if a not in sd:
            raise ValueError(f"open_clip checkpoint lacks {a!r}: not a ViT CLIP layout clipforge maps")
        out[b], _ = sd[a], used.add(a)
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    used |= {"visual.proj", "text_projection"}
    for oc, hf in (
        ("visual.transformer.resblocks", "vision_model.encoder.layers"),
        ("transformer.resblocks", "text_model.encoder.layers"),
    ):
        i = 0
        while f"{oc}.{i}.ln_1.weight" in sd:
            for a, b in _tower_pairs(f"{oc}.{i}", f"{hf}.{i}"):
                for s in ("weight", "bias"):
                    out[f"{b}.{s}"] = sd[f"{a}.{s}"]
                    used.add(f"{a}.{s}")
            for s in ("weight", "bias"):
                q, k, v = sd[f"{oc}.{i}.attn.in_proj_{s}"].chunk(3, dim=0)
                used.add(f"{oc}.{i}.attn.in_proj_{s}")
                for name, t in (("q", q), ("k", k), ("v", v)):
                    out[f"{hf}.{i}.self_attn.{name}_proj.{s}"] = t.contiguous()
            i += 1
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"open_clip checkpoint has tensors with no CLIPModel counterpart: {left[:5]}")
    return out, extras


def hf_to_openclip(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel state dict -> open_clip CLIP state dict (logit_scale included)."""
    sd = {k: v for k, v in hf_sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    direct = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for a, b in direct.items():
        out[b] = sd[a]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    for hf, oc in (
        ("vision_model.encoder.layers", "visual.transformer.resblocks"),
        ("text_model.encoder.layers", "transformer.resblocks"),
    ):
        i = 0
        while f"{hf}.{i}.layer_norm1.weight" in sd:
            for a, b in _tower_pairs(f"{oc}.{i}", f"{hf}.{i}"):
                for s in ("weight", "bias"):
                    out[f"{a}.{s}"] = sd[f"{b}.{s}"]
            for s in ("weight", "bias"):
                out[f"{oc}.{i}.attn.in_proj_{s}"] = torch.cat(
                    [sd[f"{hf}.{i}.self_attn.{n}_proj.{s}"] for n in ("q", "k", "v")], dim=0
                )
            i += 1
    return {k: v.contiguous() for k, v in out.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch pickle read with ``weights_only=True`` (no code runs from it)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


def _resolve(target: str) -> tuple[dict, dict, Path, Path | None]:
    """(model_cfg, preprocess_cfg, weights file, dir or None) of an ``openclip:`` target."""
    name, sep, file = target.partition("=")
    if sep and name in NAMED:
        if not Path(file).is_file():
            raise FileNotFoundError(f"openclip:{target}: no weights file {file}")
        return dict(NAMED[name]), {}, Path(file), None
    if sep and not Path(target).is_dir():
        raise ValueError(f"openclip:{target}: unknown named config {name!r} (named: {', '.join(NAMED)})")
    d = Path(target)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"openclip:{target}: no {CONFIG_FILE} in {d} (use openclip:DIR or openclip:NAME=FILE)"
        )
    raw = json.loads((d / CONFIG_FILE).read_text())
    if "model_cfg" not in raw:
        raise ValueError(f"{d / CONFIG_FILE}: no model_cfg")
    weights = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"openclip:{target}: none of {', '.join(WEIGHT_FILES)} in {d}")
    return dict(raw["model_cfg"]), dict(raw.get("preprocess_cfg") or {}), weights, d


# -- backend protocol -----------------------------------------------------------------------------
def build_config(spec: ModelSpec | str, **options: Any) -> ModelConfig:
    spec = parse_spec(spec)
    if spec.backend != "openclip":
        raise ValueError(f"not an openclip spec: {spec}")
    model_cfg, pre_cfg, weights, d = _resolve(spec.target)
    if model_cfg.get("multimodal_cfg") is not None:  # open_clip's CoCa
        from clipforge.models import openclip_coca

        return openclip_coca.build_config(
            f"openclip:{spec.target}", model_cfg, pre_cfg, weights, d, **options
        )
    hf_cfg = hf_config_from_openclip(model_cfg)
    pre = preprocess_from_openclip(pre_cfg, int(hf_cfg.vision_config.image_size))
    bias = model_cfg.get("init_logit_bias")
    opts = {
        "unlock_image": -1,
        "unlock_text": -1,
        **options,
        "path": str(d or weights.parent),
        "weights": str(weights),
        "model_type": "clip",
        "hf_config": hf_cfg.to_dict(),
        "tokenizer_dir": str(_tokenizer_dir(model_cfg, d) or ""),
        "open_clip_cfg": model_cfg,
    }
    return ModelConfig(
        backend="openclip",
        spec=f"openclip:{spec.target}",
        embed_dim=int(hf_cfg.projection_dim),
        init_logit_scale=float(model_cfg.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=None if bias is None else float(bias),
        preprocess=pre.to_dict(),
        context_length=int(hf_cfg.text_config.max_position_embeddings),
        options=opts,
    )


def _tokenizer_dir(model_cfg: dict, d: Path | None) -> Path | None:
    if d is not None and ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
        return d
    name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if name and Path(name).is_dir():
        return Path(name)
    return None


def build(config: ModelConfig, tokenizer=None, pretrained: bool = True):
    """Convert the checkpoint into a CLIPModel (``pretrained=False``: a skeleton a saved dir fills)."""
    from transformers import CLIPConfig, CLIPModel

    from clipforge.models.hf import HFClipModel
    from clipforge.models.tokenizer import Tokenizer

    o = config.options
    if o.get("model_type") == "coca":
        from clipforge.models import openclip_coca

        return openclip_coca.build(config, tokenizer=tokenizer, pretrained=pretrained)
    if tokenizer is None:
        if not o.get("tokenizer_dir"):
            raise FileNotFoundError(
                f"{config.spec}: no tokenizer: put tokenizer.json (or CLIP's vocab.json + merges.txt) in "
                f"{o['path']}, or set text_cfg.hf_tokenizer_name to a local dir"
            )
        tokenizer = Tokenizer.from_dir(o["tokenizer_dir"], context_length=config.context_length)
    hf_model = None
    d = dict(o["hf_config"])
    d.pop("model_type", None)
    if pretrained:
        hf_model = CLIPModel(CLIPConfig(**d))
        hf_sd, extras = openclip_to_hf(read_state_dict(o["weights"]))
        try:
            missing, unexpected = hf_model.load_state_dict(hf_sd, strict=False)
        except RuntimeError as e:  # shape mismatches: the weights are not those of model_cfg's layout
            raise ValueError(
                f"{config.spec}: weights do not fit open_clip_config.json: {str(e)[:500]}"
            ) from None
        missing = [k for k in missing if not k.endswith("position_ids") and k != "logit_scale"]
        if missing or unexpected:
            raise ValueError(
                f"{config.spec}: weights do not fit the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            if "logit_scale" in extras:
                hf_model.logit_scale.copy_(extras["logit_scale"].float().reshape(()))
        hf_model.eval()
    model = HFClipModel(config, tokenizer=tokenizer, pretrained=False, hf_model=hf_model)
    if pretrained and "logit_bias" in extras and model.logit_bias is not None:
        with torch.no_grad():
            model.logit_bias.copy_(extras["logit_bias"].float().reshape(()))
    return model


register_backend(Backend("openclip", "clipforge.models.openclip", "openclip:DIR or openclip:NAME=FILE"))
