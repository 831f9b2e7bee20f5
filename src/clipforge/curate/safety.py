"""``safety`` stage: zero-shot NSFW / violence scores from any clipforge model and a shipped prompt set.

Documented as a WEAK filter: zero-shot CLIP safety scores are noisy (LAION's own NSFW detector is a
trained head on CLIP embeddings). The score columns are the hook: a trained head can replace the
prompt classifier later without changing how filters consume ``nsfw_score``/``violence_score``.
"""

from __future__ import annotations

import numpy as np
import torch

from clipforge.curate.clipscore import image_embeddings
from clipforge.curate.stages import Batch, Columns, Context, data_path, read_json, register_stage
from clipforge.models import encode


def prompt_bank(ctx: Context) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """(category names, [P, D] prompt embeddings, [P] category index per prompt, logit scale)."""

    def build():
        spec = read_json(data_path(ctx.config.safety_prompts, "safety_prompts.json"))
        cats = list(spec["categories"])
        prompts = [(ci, p) for ci, c in enumerate(cats) for p in spec["categories"][c]]
        if not prompts:
            raise ValueError("safety prompt file has no prompts")
        model = ctx.model
        texts = [p for _, p in prompts]
        emb = encode.embed_texts(model, texts, batch_size=len(texts))  # the one encode loop, one batch
        with torch.no_grad():
            scale = float(model.logit_scale.exp().clamp(max=100.0))
        return cats, emb, np.array([ci for ci, _ in prompts]), scale

    return ctx.cached("safety_prompts", build)


@register_stage("safety", needs_model=True)
def safety_stage(batch: Batch, ctx: Context) -> Columns:
    """Per category, the softmax mass of its prompts vs. all prompts; ``unsafe_score`` = max unsafe."""
    cats, bank, cat_of, scale = prompt_bank(ctx)
    spec_unsafe = [c for c in cats if c != "safe"]
    img = image_embeddings(batch, ctx)
    logits = scale * (np.nan_to_num(img) @ bank.T)  # [B, P]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    valid = ~np.isnan(img).any(axis=1)
    cols: Columns = {}
    per_cat = {}
    for ci, c in enumerate(cats):
        mass = p[:, cat_of == ci].sum(axis=1)
        per_cat[c] = mass
        if c != "safe":
            cols[f"{c}_score"] = [float(v) if ok else None for v, ok in zip(mass, valid)]
    worst = np.max(np.stack([per_cat[c] for c in spec_unsafe]), axis=0) if spec_unsafe else np.zeros(len(img))
    cols["unsafe_score"] = [float(v) if ok else None for v, ok in zip(worst, valid)]
    return cols
