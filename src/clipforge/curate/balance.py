"""``balance`` stage: MetaCLIP-style concept balancing (Xu et al. 2023, "Demystifying CLIP Data").

1. Match every caption against a list of concepts (whole-word substrings, multi-word entries allowed).
2. Count matches per concept over the whole pool.
3. A sample is kept with probability ``max over its concepts of min(1, t / count(concept))``: head
   concepts (``count > t``) are sampled down to about ``t`` samples each, tail concepts are kept whole.
   Samples matching no concept get ``unmatched_prob`` (MetaCLIP drops them: 0).

The draw is a deterministic hash of ``(seed, key)``, so a rerun keeps the same samples. Columns:
``concepts`` (``|``-joined), ``n_concepts``, ``balance_prob``, ``balance_keep``. The concept
distribution before and after is returned for the report. ``t`` defaults to MetaCLIP's 20,000 (for a
400M pool); scale it with your pool size.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from clipforge.curate.config import BalanceConfig
from clipforge.curate.stages import data_path, read_word_list, register_stage
from clipforge.curate.text import words


class ConceptMatcher:
    """Whole-word n-gram lookup: O(words x max n-gram length) per caption, independent of list size."""

    def __init__(self, concepts: list[str]) -> None:
        self.concepts = {" ".join(words(c)): c for c in concepts if words(c)}
        self.max_n = max((len(c.split()) for c in self.concepts), default=1)

    def __call__(self, caption: str | None) -> list[str]:
        toks = words(caption or "")
        found: dict[str, None] = {}
        for n in range(1, self.max_n + 1):
            for a in range(len(toks) - n + 1):
                c = self.concepts.get(" ".join(toks[a : a + n]))
                if c is not None:
                    found[c] = None
        return list(found)


def keep_draw(seed: int, key: str) -> float:
    """Uniform [0, 1) from a hash of (seed, key): same samples kept on every rerun and engine."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def balance(
    keys: list[str], captions: list[str | None], concepts: list[str], cfg: BalanceConfig
) -> dict[str, Any]:
    """The balance columns plus ``__stats__`` (concept counts before / expected after / kept)."""
    if cfg.t < 1:
        raise ValueError("balance t must be >= 1")
    match = ConceptMatcher(concepts)
    matched = [match(c) for c in captions]
    before = Counter(c for m in matched for c in m)
    probs = [max((min(1.0, cfg.t / before[c]) for c in m), default=cfg.unmatched_prob) for m in matched]
    keep = [keep_draw(cfg.seed, k) < p for k, p in zip(keys, probs)]
    after = Counter(c for m, kp in zip(matched, keep) if kp for c in m)
    stats = {
        "t": cfg.t,
        "concepts_used": len(before),
        "unmatched": sum(not m for m in matched),
        "kept": sum(keep),
        "before": dict(before.most_common()),
        "after": {c: after.get(c, 0) for c, _ in before.most_common()},
    }
    return {
        "key": keys,
        "concepts": ["|".join(m) for m in matched],
        "n_concepts": [len(m) for m in matched],
        "balance_prob": probs,
        "balance_keep": keep,
        "__stats__": stats,
    }


@register_stage("balance", kind="global")
def balance_stage(table: Any, emb: dict, ctx: Any, evalset: Any = None) -> dict[str, Any]:
    """MetaCLIP concept balancing: cap samples per concept at t, sample the rest."""
    cfg: BalanceConfig = ctx.config.balance
    if "caption" not in table.column_names:
        raise ValueError("balance needs captions in the score table")
    concepts = read_word_list(data_path(cfg.concepts, "concepts.txt"))
    return balance(table.column("key").to_pylist(), table.column("caption").to_pylist(), concepts, cfg)
