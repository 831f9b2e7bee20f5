"""Generated compositionality probes on any caption set: SugarCrepe-style edits and ARO-style orderings.

Each probe item pairs an image with its true caption and a hard negative made by one rule:

* ``replace_obj`` / ``replace_att`` / ``replace_rel``: one person/animal/object noun, colour/size/number
  word, or spatial relation/action word swapped for another of the *same* closed list;
* ``swap_obj`` / ``swap_att``: two nouns (two attribute words) of the caption trade places;
* ``add_obj`` / ``add_att``: "with a X" after a noun, or an adjective before a noun;
* ``order_nouns_adjs`` / ``order_trigrams`` / ``order_reverse`` (ARO): the caption's listed nouns and
  adjectives shuffled among themselves, its word trigrams shuffled, its words reversed.

The word lists ship as ``wordlists.json`` (closed lists: no POS tagger is used: the PyPI spaCy model
wheels are third-party re-uploads and TextBlob's tagger downloads NLTK data at run time). Rule-made
negatives are often *ungrammatical or implausible*, which a text-only LM can spot without the image;
:mod:`clipforge.evaluate.blindlm` filters them, so each item carries several ``candidates`` for it.

Deterministic: the choices for (type, image key) come from a generator seeded with (seed, type, key),
so the items of one type do not depend on which other types were asked for. With ``frequency=True``
the substitutes are drawn in proportion to their count in the whole caption set (a listed word the
captions never use is never proposed): a blind LM wins rule-made probes largely by word frequency
("a camel", "a silver dog"), and in-domain frequent words take that away (the items then depend on
the caption set, still not on the other types).
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

REPLACE = ("replace_obj", "replace_att", "replace_rel")
SWAP = ("swap_obj", "swap_att")
ADD = ("add_obj", "add_att")
ORDER = ("order_nouns_adjs", "order_trigrams", "order_reverse")
PROBE_TYPES = REPLACE + SWAP + ADD + ORDER
DETERMINERS = {"a", "an", "the", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
               "his", "her", "their", "its", "one", "another", "some", "several", "many"}  # fmt: skip
PUNCT = {".", ",", "!", "?", ";", ":"}


@dataclass(frozen=True)
class WordLists:
    """The closed lists, indexed for lookup: word -> (category, number) for nouns."""

    nouns: dict[str, tuple[str, int]]  # form -> (category, 0 singular / 1 plural)
    forms: dict[str, list[list[str]]]  # category -> [[singular, plural], ...]
    attributes: dict[str, list[str]]  # colours / sizes / numbers
    relations: dict[str, list[str]]  # spatial (may be multi-word) / actions

    def attribute_category(self, w: str) -> str | None:
        return next((c for c, ws in self.attributes.items() if w in ws), None)


@lru_cache(maxsize=1)
def word_lists() -> WordLists:
    raw = json.loads(resources.files("clipforge.evaluate").joinpath("wordlists.json").read_text())
    nouns: dict[str, tuple[str, int]] = {}
    forms = {c: raw[c] for c in ("people", "animals", "objects")}
    for c, pairs in forms.items():
        for sing, plur in pairs:
            nouns.setdefault(sing, (c, 0))
            nouns.setdefault(plur, (c, 1))
    return WordLists(
        nouns=nouns,
        forms=forms,
        attributes={c: raw[c] for c in ("colours", "sizes", "numbers")},
        relations={c: raw[c] for c in ("spatial", "actions")},
    )


def item_rng(seed: int, kind: str, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), zlib.crc32(key.encode())])


def _join(words: list[str]) -> str:
    return " ".join(words)


def _article(words: list[str], i: int) -> None:
    """Make the article before position ``i`` agree with the word now at ``i`` (a/an), in place."""
    if i > 0 and words[i - 1].lower() in ("a", "an"):
        an = words[i][:1].lower() in "aeiou"
        art = "an" if an else "a"
        words[i - 1] = art.capitalize() if words[i - 1][:1].isupper() else art


def _sub(words: list[str], i: int, n: int, new: list[str]) -> list[str]:
    out = words[:i] + new + words[i + n :]
    if i == 0 and words[0][:1].isupper():
        out[0] = out[0][:1].upper() + out[0][1:]
    _article(out, i)
    return out


def _lower(words: list[str]) -> list[str]:
    return [w.lower() for w in words]


def _find_phrases(lw: list[str], phrases: list[str]) -> list[tuple[int, int, str]]:
    """(start, length, phrase) of each listed phrase in the lowercased words (longest first)."""
    hits, taken = [], set()
    for p in sorted(phrases, key=lambda s: -len(s.split())):
        ps = p.split()
        for i in range(len(lw) - len(ps) + 1):
            if lw[i : i + len(ps)] == ps and not taken & set(range(i, i + len(ps))):
                hits.append((i, len(ps), p))
                taken |= set(range(i, i + len(ps)))
    return sorted(hits)


def _noun_positions(lw: list[str], wl: WordLists) -> list[int]:
    return [i for i, w in enumerate(lw) if w in wl.nouns]


def _attr_positions(lw: list[str], wl: WordLists, cats: tuple[str, ...]) -> list[int]:
    return [i for i, w in enumerate(lw) if wl.attribute_category(w) in cats]


def _pick(rng: np.random.Generator, xs: list[Any], k: int) -> list[Any]:
    if len(xs) <= k:
        return [xs[i] for i in rng.permutation(len(xs))]
    return [xs[i] for i in rng.choice(len(xs), size=k, replace=False)]


def _pick_words(rng: np.random.Generator, xs: list[str], k: int, counts: Counter | None) -> list[str]:
    """Up to ``k`` of ``xs``: uniformly, or (``counts``) in proportion to each word's count, unseen ones never."""
    if counts is None:
        return _pick(rng, xs, k)
    w = np.array([min(counts[t] for t in x.split()) for x in xs], dtype=np.float64)
    xs = [x for x, c in zip(xs, w) if c > 0]
    w = w[w > 0]
    if not xs:
        return []
    idx = rng.choice(len(xs), size=min(k, len(xs)), replace=False, p=w / w.sum())
    return [xs[i] for i in idx]


def word_counts(captions: dict[str, list[str]]) -> Counter:
    """Lowercased word counts over every caption (the frequency the substitutes are drawn by)."""
    return Counter(w for caps in captions.values() for c in caps if c for w in c.lower().split())


def negatives(kind: str, caption: str, rng: np.random.Generator, k: int = 6,
              counts: Counter | None = None) -> list[str]:  # fmt: skip
    """Up to ``k`` distinct hard negatives of ``caption`` by rule ``kind`` ([] when it does not apply).

    ``counts``: draw replacement / added words by their frequency in the caption set (``word_counts``).
    """
    wl = word_lists()
    words = caption.split()
    lw = _lower(words)
    present = set(lw)
    out: list[list[str]] = []
    if kind == "replace_obj":
        pos = _noun_positions(lw, wl)
        if pos:
            i = int(rng.choice(pos))
            cat, num = wl.nouns[lw[i]]
            alts = [f[num] for f in wl.forms[cat] if f[num] not in present and lw[i] not in f]
            out = [_sub(words, i, 1, [a]) for a in _pick_words(rng, alts, k, counts)]
    elif kind == "replace_att":
        pos = _attr_positions(lw, wl, ("colours", "sizes", "numbers"))
        if pos:
            i = int(rng.choice(pos))
            cat = wl.attribute_category(lw[i])
            alts = [a for a in wl.attributes[cat] if a not in present and {a, lw[i]} != {"gray", "grey"}]
            out = [_sub(words, i, 1, [a]) for a in _pick_words(rng, alts, k, counts)]
    elif kind == "replace_rel":
        hits = [(i, n, p, "spatial") for i, n, p in _find_phrases(lw, wl.relations["spatial"])]
        hits += [(i, 1, w, "actions") for i, w in enumerate(lw) if w in wl.relations["actions"]]
        if hits:
            i, n, p, cat = hits[int(rng.integers(len(hits)))]
            alts = [a for a in wl.relations[cat] if a != p and not (cat == "actions" and a in present)]
            out = [_sub(words, i, n, a.split()) for a in _pick_words(rng, alts, k, counts)]
    elif kind in SWAP:
        pos = (_noun_positions(lw, wl) if kind == "swap_obj"
               else _attr_positions(lw, wl, ("colours", "sizes")))  # fmt: skip
        pairs = [(a, b) for ai, a in enumerate(pos) for b in pos[ai + 1 :] if lw[a] != lw[b]]
        for a, b in _pick(rng, pairs, k):
            w = list(words)
            w[a], w[b] = lw[b], lw[a]
            if a == 0 and words[0][:1].isupper():
                w[0] = w[0].capitalize()
            _article(w, a)
            _article(w, b)
            out.append(w)
    elif kind == "add_obj":
        pos = _noun_positions(lw, wl)
        if pos:
            i = int(rng.choice(pos))
            alts = [f[0] for c in ("animals", "objects") for f in wl.forms[c] if not present & set(f)]
            for a in _pick_words(rng, alts, k, counts):
                art = "an" if a[0] in "aeiou" else "a"
                out.append(words[: i + 1] + ["with", art, a] + words[i + 1 :])
    elif kind == "add_att":
        pos = [i for i in _noun_positions(lw, wl) if i > 0 and lw[i - 1] in DETERMINERS]
        if pos:
            i = int(rng.choice(pos))
            alts = [a for c in ("colours", "sizes") for a in wl.attributes[c] if a not in present]
            out = [_sub(words, i, 0, [a]) for a in _pick_words(rng, alts, k, counts)]
    elif kind in ORDER:
        out = _order(kind, words, lw, wl, rng, k)
    else:
        raise ValueError(f"unknown probe type {kind!r}: use {', '.join(PROBE_TYPES)}")
    seen, res = {caption.lower()}, []
    for w in out:
        s = _join(w)
        if s.lower() not in seen:
            seen.add(s.lower())
            res.append(s)
    return res


def _order(kind: str, words: list[str], lw: list[str], wl: WordLists, rng: np.random.Generator,
           k: int) -> list[list[str]]:  # fmt: skip
    tail = [words[-1]] if words and words[-1] in PUNCT else []
    body = lw[: len(lw) - len(tail)]
    out = []
    for _ in range(k * 3 if kind != "order_reverse" else 1):
        if kind == "order_reverse":
            w = body[::-1]
        elif kind == "order_trigrams":
            tri = [body[i : i + 3] for i in range(0, len(body), 3)]
            if len(tri) < 2:
                return []
            w = [x for j in rng.permutation(len(tri)) for x in tri[j]]
        else:
            pos = [
                i
                for i, x in enumerate(body)
                if x in wl.nouns or wl.attribute_category(x) in ("colours", "sizes")
            ]
            if len(pos) < 2:
                return []
            w = list(body)
            for src, dst in zip(pos, rng.permutation(pos)):
                w[dst] = body[src]
        if w != body:
            w = [w[0].capitalize(), *w[1:]] if words[0][:1].isupper() else w
            out.append(w + tail)
        if len(out) >= k:
            break
    return out


def generate(
    captions: dict[str, list[str]],
    types: tuple[str, ...] | list[str] = PROBE_TYPES,
    *,
    seed: int = 0,
    candidates: int = 6,
    max_items: int | None = None,
    per_image: int = 1,
    frequency: bool = False,
) -> list[dict[str, Any]]:
    """Probe items ``{"id", "type", "image", "positive", "candidates"}`` for ``{image key: captions}``.

    Per type and image, the captions are tried in a seeded order and the first one the rule applies to
    gives the item (so one item per image and type at most). With ``per_image`` > 1 the first
    ``per_image`` such captions each give an item, marked ``group`` (type/image) and ``attempt``
    (0, 1, ...): the blind filter tries them in turn and keeps one per group. With ``max_items``, the
    images are taken in one seeded order (the same for every type, so the types share images and an
    LM scores each caption once) until ``max_items`` of them gave an item. ``candidates`` negatives are proposed per item (the
    blind-LM filter chooses among them; without it the first is the negative). ``frequency``: see the
    module docstring.
    """
    bad = [t for t in types if t not in PROBE_TYPES]
    if bad:
        raise ValueError(f"unknown probe type(s) {bad}: use {', '.join(PROBE_TYPES)}")
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    counts = word_counts(captions) if frequency else None
    keys = sorted(captions)
    items = []
    for t in types:
        order = keys
        if max_items is not None and max_items < len(keys):
            perm = np.random.default_rng([seed, zlib.crc32(b"images")]).permutation(len(keys))
            order = [keys[i] for i in perm]
        n = 0
        for key in order:
            if max_items is not None and n >= max_items:
                break
            rng = item_rng(seed, t, key)
            caps = [c.strip() for c in captions[key] if c and c.strip()]
            found = 0
            for ci in rng.permutation(len(caps)) if caps else []:
                negs = negatives(t, caps[ci], rng, candidates, counts)
                if not negs:
                    continue
                it = {"id": f"{t}/{key}", "type": t, "image": key, "positive": caps[ci], "candidates": negs}
                if per_image > 1:
                    it.update(id=f"{t}/{key}/{found}", group=f"{t}/{key}", attempt=found)
                items.append(it)
                found += 1
                if found >= per_image:
                    break
            n += found > 0
    return items
