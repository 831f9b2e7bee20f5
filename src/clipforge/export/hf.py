"""``--format hf``: a transformers ``CLIPModel`` / ``SiglipModel`` dir (``AutoModel.from_pretrained(DIR)``).

Only models that run on those modules map (``hf:``, ``scratch:``, ``openclip:``); clipforge's own
logit scale (and bias) are the trained ones, so they replace the frozen copies inside the HF module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


def supports(model: nn.Module) -> str | None:
    """None when the model maps onto a transformers CLIPModel/SiglipModel, else why not."""
    from clipforge.models.hf import HFClipModel

    if not isinstance(model, HFClipModel):
        return f"its architecture ({type(model).__name__}) is not a transformers CLIPModel/SiglipModel"
    return None


def export(model: nn.Module, out: Path) -> dict[str, Any]:
    from clipforge.export.tokenizer_files import save_hf_tokenizer

    hf = model.hf
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    sd["logit_scale"] = model.logit_scale.detach().clone().reshape(sd["logit_scale"].shape)
    notes = []
    if model.logit_bias is not None:
        if "logit_bias" in sd:
            sd["logit_bias"] = model.logit_bias.detach().clone().reshape(sd["logit_bias"].shape)
        else:
            notes.append(
                f"logit_bias={float(model.logit_bias):.4f} (SigLIP-style loss) has no place in CLIPModel: "
                "recorded in the model card only"
            )
    hf.save_pretrained(str(out), state_dict=sd, safe_serialization=True)
    files = ["config.json", "model.safetensors", *save_hf_tokenizer(model, out)]
    files.append(_save_image_processor(model, out))
    return {"files": sorted(set(files)), "notes": notes, "model_type": hf.config.model_type}


def _save_image_processor(model: nn.Module, out: Path) -> str:
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from clipforge.data.transforms import PreprocessConfig

    p = PreprocessConfig.from_dict(model.config.preprocess)
    resample = {"bicubic": 3, "bilinear": 2}.get(p.interpolation, 3)
    common = {"image_mean": list(p.mean), "image_std": list(p.std), "resample": resample}
    if model.siglip:
        proc = SiglipImageProcessor(size={"height": p.size, "width": p.size}, **common)
    elif p.resize_mode == "squash":
        proc = CLIPImageProcessor(size={"height": p.size, "width": p.size}, do_center_crop=False, **common)
    else:
        proc = CLIPImageProcessor(
            size={"shortest_edge": p.size}, crop_size={"height": p.size, "width": p.size}, **common
        )
    proc.save_pretrained(str(out))
    return "preprocessor_config.json"
