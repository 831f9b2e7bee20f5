"""``clipforge caption eval`` / :func:`evaluate_captioning`: a captioner scored on shards with references.

The result JSON has the layout of every other eval task (``{"model", "results": [{"task", "dataset",
"shards", "metrics"}]}``), so ``clipforge eval compare`` works on it; the built-in baselines are
rows of their own (task ``captioning/<baseline>``) scored exactly like the captioner.

Self-retrieval and CLIPScore use a *scoring model*: it should not be the captioner's own encoder
(a captioner can learn to please the model it reads); the output names it and says when it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.caption.captioner import Captioner
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.features import shard_conditions, training_set
from clipforge.caption.metrics import caption_stats, clip_scores, coco_scores, self_retrieval

log = logging.getLogger(__name__)


@dataclass
class CaptionEvalConfig:
    captioner: str = field(default="", metadata={"help": "captioner dir"})
    data: list[str] = field(default_factory=list, metadata={"help": "shards with reference captions"})
    train_data: list[str] = field(
        default_factory=list,
        metadata={"help": "training shards (baselines, novelty; default: the captioner's)"},
    )
    encoder: str = field(
        default="", metadata={"help": "the encoder's spec, if not the saved one (py: specs)"}
    )
    scoring_model: str = field(
        default="",
        metadata={"help": "CLIP model for CLIPScore/self-retrieval (default: the encoder; 'none')"},
    )
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    decap_temperature: float | None = field(default=None, metadata={"help": "text-only: DeCap T (0: off)"})
    baselines: bool = field(default=True, metadata={"help": "score constant / nearest / kNN baselines"})
    knn_k: int = 40
    limit: int | None = field(default=None, metadata={"help": "score only the first N images"})
    workers: int = 1
    cache_dir: str | None = field(
        default=None, metadata={"help": "feature cache of the training shards (used when it exists)"}
    )


def _scoring_images(scorer: Any, data: list[str], keys: list[str], workers: int) -> np.ndarray:
    c = shard_conditions(scorer, data, "embedding", workers=workers, fields=())
    pos = {k: i for i, k in enumerate(c.keys)}
    return c.cond.numpy()[[pos[k] for k in keys]]


def _clip_metrics(scorer: Any, img: np.ndarray, texts: list[str], refs: list[list[str]]) -> dict[str, float]:
    s = clip_scores(scorer, img, texts, refs)
    r = self_retrieval(s["text_emb"], img)
    return {
        "clip_score": float(s["clip_score"].mean()),
        "ref_clip_score": float(s["ref_clip_score"].mean()),
        "self_r@1": r["r@1"],
        "self_r@5": r["r@5"],
    }


def evaluate_captioning(
    captioner: str | Path,
    data: str | list[str],
    *,
    train_data: str | list[str] | None = None,
    encoder: str | None = None,
    scoring_model: str | None = None,
    decode: DecodeOptions | None = None,
    decap_temperature: float | None = None,
    baselines: bool = True,
    knn_k: int = 40,
    limit: int | None = None,
    workers: int = 1,
    cache_dir: str | Path | None = None,
    prepared: Any = None,
) -> dict[str, Any]:
    """Captions for every image of ``data``, scored against its reference captions -> result dict.

    ``train_data`` (the captioner's training shards by default) gives the novel-caption share and
    the baselines; ``encoder``: the encoder's spec when not the saved one (``py:`` specs); ``scoring_model`` (default: the captioner's encoder, flagged in the output) scores
    CLIPScore, RefCLIPScore and self-retrieval. ``prepared`` (:class:`clipforge.caption.train.Prepared`):
    the encoder, training set and test conditions when the caller already holds them.
    """
    from clipforge.models import load_model

    t0 = time.perf_counter()
    decode = decode or DecodeOptions()
    data = [data] if isinstance(data, str) else list(data)
    cap = Captioner.load(captioner)
    enc_model = (prepared and prepared.encoder) or cap.load_encoder(encoder)
    test = (prepared and prepared.eval) or cap.shard_conditions(enc_model, data, workers=workers)
    base_kind = "embedding" if cap.condition == "spatial" else cap.condition  # baselines read vectors
    n = min(limit or len(test), len(test))
    keys, cond, refs = test.keys[:n], test.cond[:n], test.captions[:n]
    texts, _ = cap.caption(cond, decode, decap_temperature)
    enc_name = cap.meta["encoder"]["model"]
    scorer_name = scoring_model or enc_name
    scorer, img = None, None
    if scorer_name != "none":
        scorer = enc_model if scorer_name == enc_name and not scoring_model else load_model(scorer_name)
        if scorer is enc_model and cap.condition == "embedding":
            img = cond.numpy()
        else:
            img = _scoring_images(scorer, data, keys, workers)

    train_data = train_data if train_data is not None else cap.meta.get("train", {}).get("data")
    train = prepared.train if prepared is not None and train_data else None
    if train_data and train is None:
        root = Path(cache_dir) if cache_dir else Path(captioner).resolve().parent.parent / ".feature_cache"
        root = root if root.is_dir() else None  # no cache yet: encode in memory, build none here
        train = training_set(enc_model, train_data, base_kind, text=False, cache_root=root, workers=workers)

    def score(captions: list[str]) -> dict[str, Any]:
        m = coco_scores(dict(zip(keys, captions)), dict(zip(keys, refs)))
        if scorer is not None:
            m.update(_clip_metrics(scorer, img, captions, refs))
        tc = [c for caps in train.cond.captions for c in caps] if train is not None else None
        m.update(caption_stats(captions, tc))
        return m

    from clipforge.evaluate.results import shard_fingerprint

    dataset = ",".join(Path(d).name for d in data)
    shards = shard_fingerprint(data)
    extra = {"decoding": decode.describe(), "scoring_model": scorer_name,
             "scoring_model_is_encoder": scorer is enc_model, "n_images": n}  # fmt: skip
    results = [{"task": "captioning", "dataset": dataset, "shards": shards, "metrics": score(texts), **extra}]
    if baselines and train is not None:
        from clipforge.caption.baselines import baseline_captions

        base = cond
        if base_kind != cap.condition:
            base = shard_conditions(enc_model, data, base_kind, workers=workers).cond[:n]
        for name, caps in baseline_captions(train.cond.cond, train.cond.captions, base, knn_k).items():
            results.append({"task": f"captioning/{name}", "dataset": dataset, "shards": shards,
                            "metrics": score(caps), **extra})  # fmt: skip
    return {
        "model": {"captioner": str(captioner), "mode": cap.mode, "encoder": cap.meta["encoder"]},
        "results": results,
        "samples": [
            {"key": k, "caption": t, "references": r} for k, t, r in list(zip(keys, texts, refs))[:20]
        ],
        "bad_samples": test.bad.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
