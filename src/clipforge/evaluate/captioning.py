"""``clipforge eval captioning``: a captioner's scores as an eval result file (caption/evaluate.py does the work).

The caption package owns the metrics (:func:`clipforge.caption.evaluate.evaluate_captioning`); this
module only puts its result into the layout every eval task writes (``clipforge_eval``, ``created``,
``model``, ``settings``, ``results``), so ``clipforge eval compare`` works on two captioners, and gives
the headline rows of the table ``eval run`` prints.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

HEADLINE = ("bleu4", "cider_d", "meteor", "rouge_l", "clip_score", "ref_clip_score", "self_r@1", "mean_length")  # fmt: skip


def captioning_report(cfg: Any, data: list[str], scoring_model: str | None = None) -> dict[str, Any]:
    """Score the captioner ``cfg.captioner`` (a :class:`CaptionEvalConfig`) on ``data`` -> eval result.

    ``scoring_model`` replaces ``cfg.scoring_model`` when the config leaves it empty (``eval run`` passes
    the model under evaluation, so CLIPScore is not judged by the captioner's own encoder).
    """
    from clipforge.caption.evaluate import evaluate_captioning

    if not cfg.captioner:
        raise ValueError("eval captioning needs --captioner DIR")
    if not data:
        raise ValueError("eval captioning needs shards with reference captions (--data or --data-root)")
    t0 = time.perf_counter()
    res = evaluate_captioning(
        cfg.captioner, data, train_data=cfg.train_data or None, encoder=cfg.encoder or None,
        scoring_model=cfg.scoring_model or scoring_model or None, decode=cfg.decode,
        decap_temperature=cfg.decap_temperature, baselines=cfg.baselines, knn_k=cfg.knn_k, limit=cfg.limit,
        workers=cfg.workers, cache_dir=cfg.cache_dir,
    )  # fmt: skip
    for r in res["results"]:
        r.setdefault("templates", None)
        r.setdefault("bad_samples", res.get("bad_samples"))
    model = dict(res.get("model", {}))
    model.setdefault("spec", f"captioner:{cfg.captioner}")
    return {
        "clipforge_eval": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **res,
        "model": model,
        "settings": {"decoding": cfg.decode.describe(), "limit": cfg.limit, "baselines": cfg.baselines},
        "seconds": time.perf_counter() - t0,
    }


def caption_rows(report: dict[str, Any], dataset_col: bool = False) -> list[list[Any]]:
    """One row per captioning result (the captioner, then its baselines): ``[task, *HEADLINE]``."""
    rows = []
    for r in report["results"]:
        if not r["task"].startswith("captioning"):
            continue
        vals = [r["metrics"].get(c, float("nan")) for c in HEADLINE]
        rows.append([r["dataset"], r["task"], *vals] if dataset_col else [r["task"], *vals])
    return rows
