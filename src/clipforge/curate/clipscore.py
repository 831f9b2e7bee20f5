"""``clip-score`` stage: cosine similarity of each image and its caption under any clipforge model.

This is the LAION/DataComp "CLIP score" filter signal. The image and text embeddings are kept as
float16 ``.npy`` files beside the score table (columns ``__emb_image__``/``__emb_text__``) so dedup,
eval-set dedup and safety reuse them instead of re-running the model. The model work is the one
encode layer (:mod:`clipforge.models.encode`); this stage keeps only the NaN rows for missing inputs.
With ``runtime: onnx`` (``--runtime onnx``) the model stages run the model's onnx export in
onnxruntime (:func:`stage_model`; exported once into the cache by fingerprint, as index/serve do).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from clipforge.curate.config import CurateConfig
from clipforge.curate.stages import Batch, Columns, Context, batch_images, register_stage
from clipforge.models import encode

ONNX_UNSUPPORTED = ("copy",)  # pre-head features: the onnx graphs emit the final embedding only


def stage_model(config: CurateConfig, model: Any = None) -> Any:
    """The model the model stages run: ``model`` (a loaded model) or ``config.model`` loaded, as the
    torch model or, with ``config.runtime == "onnx"``, its onnx export in onnxruntime (threads: torch's)."""
    from clipforge.export.runtime import OnnxClipModel, is_onnx_export, load_runtime

    if model is None:
        from clipforge.models.spec import SPEC_HELP

        if not config.model:
            raise ValueError(f"this stage needs a model: pass --model SPEC ({SPEC_HELP})")
        if is_onnx_export(config.model):
            return load_runtime(config.model, config.runtime)  # refuses runtime torch by name
        from clipforge.models import load_model  # the one spec parser and backend table

        model = load_model(config.model)
    if config.runtime == "torch" or isinstance(model, OnnxClipModel):
        return model.eval()
    return load_runtime(model, "onnx")


def check_runtime_stages(config: CurateConfig, stage_names: list[str]) -> None:
    """What ``runtime: onnx`` cannot do is refused up front: stages that need the torch model's
    internals, and another input size than the graphs were exported at."""
    if config.runtime != "onnx":
        return
    bad = [s for s in stage_names if s in ONNX_UNSUPPORTED]
    if bad:
        raise ValueError(
            f"stage(s) {', '.join(bad)} need the torch model's pre-head features: run them with --runtime torch"
        )
    if config.image_size:
        raise ValueError("--runtime onnx: the graphs take the exported input size; drop --image-size")


def model_transform(ctx: Context):
    """The model's eval preprocessing, at ``config.image_size`` when given (cheaper on CPU)."""

    def build():
        model = ctx.model
        if not ctx.config.image_size:
            return model.preprocess
        from clipforge.data.transforms import ImageTransform, PreprocessConfig

        cfg = PreprocessConfig.from_dict({**model.preprocess.cfg.to_dict(), "size": ctx.config.image_size})
        return ImageTransform(cfg, train=False)

    return ctx.cached("transform", build)


def image_embeddings(batch: Batch, ctx: Context) -> np.ndarray:
    """[B, D] float32 unit image embeddings; NaN rows where the image is missing or undecodable."""
    if "__emb_image__" in batch:
        return batch["__emb_image__"]
    t0 = time.perf_counter()
    imgs = batch_images(batch, ctx.config.draft_size)
    transform = model_transform(ctx)
    ok = [i for i, im in enumerate(imgs) if im is not None]
    pixels = [transform(imgs[i]) for i in ok]
    t1 = time.perf_counter()
    model = ctx.model
    dim = int(model.config.embed_dim)
    out = np.full((len(imgs), dim), np.nan, dtype=np.float32)
    if ok:
        emb = encode.embed_pixels(model, torch.stack(pixels))
        out[ok] = emb
        dim = emb.shape[1]
    batch["__emb_image__"] = out
    ctx.timing["decode_s"] = ctx.timing.get("decode_s", 0.0) + (t1 - t0)
    ctx.timing["model_s"] = ctx.timing.get("model_s", 0.0) + (time.perf_counter() - t1)
    return out


def text_embeddings(batch: Batch, ctx: Context) -> np.ndarray:
    """[B, D] float32 unit caption embeddings; NaN rows where the caption is missing."""
    if "__emb_text__" in batch:
        return batch["__emb_text__"]
    t0 = time.perf_counter()
    caps = batch["caption"]
    ok = [i for i, c in enumerate(caps) if c]
    model = ctx.model
    out = np.full((len(caps), int(model.config.embed_dim)), np.nan, dtype=np.float32)
    if ok:
        emb = encode.embed_texts(model, [caps[i] for i in ok], batch_size=len(ok))  # one batch
        if emb.shape[1] != out.shape[1]:
            out = np.full((len(caps), emb.shape[1]), np.nan, dtype=np.float32)
        out[ok] = emb
    batch["__emb_text__"] = out
    ctx.timing["model_s"] = ctx.timing.get("model_s", 0.0) + (time.perf_counter() - t0)
    return out


@register_stage("clip-score", needs_model=True)
def clip_score_stage(batch: Batch, ctx: Context) -> Columns:
    """Cosine similarity of image and caption embeddings (null when either side is missing)."""
    img = image_embeddings(batch, ctx)
    txt = text_embeddings(batch, ctx)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image ({img.shape[1]}) and text ({txt.shape[1]}) embedding sizes differ")
    score = (img * txt).sum(axis=1)
    return {
        "clip_score": [None if np.isnan(s) else float(s) for s in score],
        "__emb_image__": img,
        "__emb_text__": txt,
    }
