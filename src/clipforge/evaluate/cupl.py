"""CuPL class descriptions for zero-shot ("What does a platypus look like?"), written by an offline LLM.

``eval zeroshot --descriptions generate --llm smollm2`` asks the LLM a few questions per class
(:data:`PROMPTS`), samples a few answers to each, keeps answers that name the class (a 135M model
often drifts to another object; a sentence about something else would pull the class embedding
away), and caches them as ``{class: [sentences]}`` JSON (the format ``--descriptions FILE`` reads)
next to the results, with a ``.meta.json`` saying which LLM, prompts and seed wrote it. The runner
then ensembles the sentences with the templates (mean of normalized text embeddings).
A class for which no answer passes keeps one plain sentence ("a photo of a {c}."), counted.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMPTS = (
    "Describe what a {c} looks like.",
    "How can you identify a {c} in a photo?",
    "What does a picture of a {c} look like?",
)
SYSTEM = "You describe how things look in photos. Answer with one short sentence that names the thing."
FALLBACK = "a photo of a {c}."


def _names_class(text: str, classname: str) -> bool:
    """Every word of the class name (letters or digits, any script) starts a word of ``text``. A name
    without one (blank, punctuation) names nothing: no answer passes, so it gets the fallback."""
    words = re.findall(r"[^\W_]+", text.lower())
    want = re.findall(r"[^\W_]+", classname.lower())
    return bool(want) and all(any(w.startswith(c) for w in words) for c in want)


def generate_descriptions(
    lm: Any,
    classnames: list[str],
    *,
    per_prompt: int = 4,
    seed: int = 0,
    max_words: int = 40,
    batch_size: int = 16,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({class: [sentences]}, stats): ``per_prompt`` sampled answers to each prompt, filtered."""
    from clipforge.caption.decoding import DecodeOptions
    from clipforge.caption.rewrite import one_line

    opts = DecodeOptions(method="sample", temperature=0.8, top_p=0.95, top_k=0, min_len=3, max_len=48,
                         no_repeat_ngram=3, seed=seed, batch_size=batch_size, num_candidates=per_prompt)  # fmt: skip
    names = list(dict.fromkeys(classnames))  # a class listed twice is asked once
    pairs = [(c, p) for c in names for p in PROMPTS]
    msgs = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p.format(c=one_line(c))}]
        for c, p in pairs
    ]
    t0 = time.perf_counter()
    drawn = lm.generate([lm.prompt(m) for m in msgs], opts)
    out: dict[str, list[str]] = {c: [] for c in names}
    rejected = {"empty": 0, "too_long": 0, "no_class_name": 0, "duplicate": 0}
    for (c, _), answers in zip(pairs, drawn):
        for a in answers:
            n = len(a.split())
            why = ("empty" if n < 3 else "too_long" if n > max_words else
                   "no_class_name" if not _names_class(a, c) else "duplicate" if a in out[c] else None)  # fmt: skip
            if why:
                rejected[why] += 1
            else:
                out[c].append(a)
    fallback = [c for c in names if not out[c]]
    for c in fallback:
        out[c] = [FALLBACK.format(c=c)]
    stats = {"llm": getattr(lm, "name", "lm"), "prompts": list(PROMPTS), "per_prompt": per_prompt, "seed": seed,
             "drawn": len(pairs) * per_prompt, "kept": sum(len(v) for v in out.values()) - len(fallback),
             "rejected": rejected, "fallback_classes": fallback, "seconds": time.perf_counter() - t0}  # fmt: skip
    return out, stats


def cached_descriptions(
    path: str | Path, classnames: list[str], llm: str, *, per_prompt: int = 4, seed: int = 0, lm: Any = None
) -> Path:
    """``path`` (JSON) holding descriptions for ``classnames`` by ``llm``: reused when its ``.meta.json``
    matches (same LLM, prompts, classes, seed), else generated (loading ``llm`` unless ``lm`` is given)."""
    from clipforge.utils import write_json

    path = Path(path)
    meta_path = path.with_suffix(".meta.json")
    want = {
        "llm_spec": llm,
        "prompts": list(PROMPTS),
        "per_prompt": per_prompt,
        "seed": seed,
        "classes": classnames,
    }
    if path.exists() and meta_path.exists():
        try:
            meta, desc = json.loads(meta_path.read_text()), json.loads(path.read_text())
            if all(meta.get(k) == v for k, v in want.items()) and all(desc.get(c) for c in classnames):
                log.info("CuPL descriptions reused from %s", path)
                return path
        except (OSError, ValueError, AttributeError):
            pass  # unreadable cache, or not a JSON object: written again below
    if lm is None:
        from clipforge.caption.llm import ChatLM

        lm = ChatLM.load(llm)
    desc, stats = generate_descriptions(lm, classnames, per_prompt=per_prompt, seed=seed)
    meta_path.unlink(missing_ok=True)  # killed between the writes: no old meta vouching for new descriptions
    write_json(path, desc)
    write_json(meta_path, {**want, **stats})
    log.info("CuPL: %d descriptions for %d classes -> %s", stats["kept"], len(classnames), path)
    return path
