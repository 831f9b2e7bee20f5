"""Tokenizer files transformers (and open_clip's HFTokenizer) read: tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def save_hf_tokenizer(model: nn.Module, out: Path) -> list[str]:
    """Write the model's tokenizer as a ``PreTrainedTokenizerFast`` dir (+ our tokenizer_meta.json)."""
    from transformers import PreTrainedTokenizerFast

    from clipforge.models.tokenizer import Tokenizer

    tok = getattr(model, "tokenizer", None)
    if not isinstance(tok, Tokenizer):
        raise ValueError(f"{model.config.spec}: its tokenizer is not a clipforge Tokenizer, cannot write it")
    backend = tok.backend
    special = {}
    pad = backend.id_to_token(tok.pad_token_id)
    if pad is not None:
        special["pad_token"] = pad
    for key, names in (
        ("bos_token", ("[CLS]", "<|startoftext|>", "<s>")),
        ("eos_token", ("[SEP]", "<|endoftext|>", "</s>")),
        ("unk_token", ("[UNK]", "<|endoftext|>", "<unk>")),
    ):
        hit = next((n for n in names if backend.token_to_id(n) is not None), None)
        if hit:
            special[key] = hit
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tok.context_length, **special)
    files = [Path(f).name for f in fast.save_pretrained(str(out))]
    tok.save(out)  # tokenizer_meta.json: pad id, context length, pad_to_max (clipforge reads it back)
    return sorted(set(files) | {"tokenizer_meta.json"})
