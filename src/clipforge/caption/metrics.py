"""Captioning metrics: COCO n-gram scores, CLIPScore / RefCLIPScore, self-retrieval, caption statistics.

- BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through ``pycocoevalcap`` after its PTB tokenizer: the
  numbers papers report. The tokenizer and METEOR run Java; without Java the n-gram scores are
  computed on a simple lower-case/punctuation split, METEOR is left out (never reported as 0), and the
  result says ``comparable: false``.
- CLIPScore (Hessel et al. 2021): ``2.5 * max(cos(image, "A photo depicts " + caption), 0)``;
  RefCLIPScore: harmonic mean of CLIPScore and the best cosine between the caption and a reference
  (references embedded with the same prefix, as the reference implementation does).
- Self-retrieval: each generated caption retrieves its own image among all scored images (R@1/R@5).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_W = 2.5


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Lower-case, punctuation removed: close to the PTB tokenizer's output on plain captions."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def _tokenize(
    refs: Mapping[str, Sequence[str]], cands: Mapping[str, str], java: bool
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    if java:  # one Java start for references and candidates together
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        both = {("g", k): [{"caption": c} for c in v] for k, v in refs.items()}
        both.update({("r", k): [{"caption": cands[k]}] for k in refs})
        out = PTBTokenizer().tokenize(both)
        return {k: out[("g", k)] for k in refs}, {k: out[("r", k)] for k in refs}
    gts = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
    return gts, {k: [simple_tokenize(cands[k])] for k in refs}


def coco_scores(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], meteor: bool = True
) -> dict[str, Any]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr-D of one candidate per key against its references.

    CIDEr-D's document frequencies come from ``references`` themselves (as in COCO evaluation), so
    scores depend on the evaluated set, not only on each caption.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [k for k in references if k not in candidates]
    if missing:
        raise ValueError(f"{len(missing)} references without a candidate (e.g. {missing[0]!r})")
    if not references:
        raise ValueError("no captions to score")
    java = java_available()
    refs = {k: [c if c.strip() else "." for c in v] for k, v in references.items()}
    cands = {k: candidates[k] if candidates[k].strip() else "." for k in refs}  # empty: scored, not dropped
    gts, res = _tokenize(refs, cands, java)
    res = {k: [v[0] if v and v[0] else "."] for k, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            out["meteor"] = float(m.compute_score(gts, res)[0])
        finally:
            del m  # its __del__ ends the Java process
    out["tokenizer"] = "ptb" if java else "simple"
    out["comparable"] = java
    if not java:
        out["note"] = "java not found: simple tokenizer, no METEOR; numbers not comparable to papers"
        log.warning(out["note"])
    return out


# -- CLIP-based scores ------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_score_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Per-pair CLIPScore: ``2.5 * max(cos, 0)`` of row i of each."""
    cos = (_unit(image_emb) * _unit(text_emb)).sum(-1)
    return CLIPSCORE_W * np.maximum(cos, 0.0)


def ref_clip_score_from_embeddings(
    clip_s: np.ndarray, cand_emb: np.ndarray, ref_emb: Sequence[np.ndarray]
) -> np.ndarray:
    """Per-pair RefCLIPScore: harmonic mean of CLIPScore and max_r max(cos(candidate, ref_r), 0)."""
    cand = _unit(cand_emb)
    best = np.array([max(float((_unit(r) @ c).max()), 0.0) if len(r) else 0.0 for c, r in zip(cand, ref_emb)])
    denom = clip_s + best
    return np.where(denom > 0, 2 * clip_s * best / np.maximum(denom, 1e-12), 0.0)


def clip_scores(
    model: Any,
    image_emb: np.ndarray,
    captions: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """CLIPScore (and RefCLIPScore with ``references``) per caption under ``model`` (the scoring model)."""
    from clipforge.models.encode import embed_texts

    cand = embed_texts(model, [CLIPSCORE_PREFIX + c for c in captions], batch_size)
    out = {"clip_score": clip_score_from_embeddings(image_emb, cand), "text_emb": cand}
    if references is not None:
        flat = [CLIPSCORE_PREFIX + r for refs in references for r in refs]
        emb = embed_texts(model, flat, batch_size) if flat else np.zeros((0, cand.shape[1]), np.float32)
        offs = np.cumsum([0, *(len(r) for r in references)])
        per = [emb[offs[i] : offs[i + 1]] for i in range(len(references))]
        out["ref_clip_score"] = ref_clip_score_from_embeddings(out["clip_score"], cand, per)
    return out


def self_retrieval(
    text_emb: np.ndarray, image_emb: np.ndarray, ks: Iterable[int] = (1, 5)
) -> dict[str, float]:
    """Caption i retrieves image i among all images: recall@k (ties count against the caption)."""
    sims = _unit(text_emb) @ _unit(image_emb).T
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(1) + (sims == own[:, None]).sum(1) - 1  # 0 = first
    return {f"r@{k}": float((rank < k).mean()) for k in ks}


# -- statistics of the generated captions ----------------------------------------------------------


def caption_stats(captions: Sequence[str], train_captions: Iterable[str] | None = None) -> dict[str, Any]:
    """Vocabulary size, mean length (words), distinct captions and, given the training captions, the
    share of captions never seen verbatim in training (after lower-casing and tokenizing)."""
    toks = [simple_tokenize(c).split() for c in captions]
    out: dict[str, Any] = {
        "n": len(captions),
        "vocab_size": len({w for t in toks for w in t}),
        "mean_length": float(np.mean([len(t) for t in toks])) if toks else 0.0,
        "distinct": len({" ".join(t) for t in toks}),
        "empty": sum(1 for t in toks if not t),
    }
    if train_captions is not None:
        seen = {simple_tokenize(c) for c in train_captions}
        out["novel_share"] = float(np.mean([" ".join(t) not in seen for t in toks])) if toks else 0.0
    return out
