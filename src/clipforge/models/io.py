"""Save / load any clipforge model: ``config.json`` + ``model.safetensors`` + tokenizer files.

We save *all* weights (frozen towers included): a saved dir is self-contained and loads exactly,
without the pretrained packages or the original HF checkpoint (the HF architecture configs ride in
``config.json``). It costs disk (~110 MB for efficientnet-lite0 + minilm-l6); a trainer that wants
small periodic checkpoints can pass ``trainable_only=True``: loading such a dir rebuilds the frozen
parts from the pretrained files and checks that exactly the non-trainable tensors were left out.

Writes are atomic: everything goes into a temp dir beside the target, which then replaces it.
Reading a dir back into a model is :func:`clipforge.models.factory.load_saved` (it needs the backend
table); this module only writes and checks files, so it imports no backend and no model class
(models are typed ``nn.Module``: base.py imports this module for ``ClipModel.save``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.models.tokenizer import Tokenizer
from clipforge.models.types import CONFIG, ModelConfig, read_config

WEIGHTS = "model.safetensors"
CAPTIONER = "captioner"  # optional subdir: a clipforge.caption.captioner.Captioner reading this model


def _state_for_saving(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in model.named_buffers() if not _buffer_frozen(model, n)}
        sd = {k: v for k, v in sd.items() if k in keep}
    out, seen = {}, {}
    for k, v in sd.items():
        ptr = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if ptr is not None and ptr in seen:  # tied weights: store once (safetensors refuses aliases)
            continue
        if ptr is not None:
            seen[ptr] = k
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def _buffer_frozen(model: nn.Module, name: str) -> bool:
    """A buffer (BN running stats) belongs to a frozen part when its module has no trainable params."""
    mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    params = list(mod.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def save_model(model: nn.Module, directory: str | Path, trainable_only: bool = False) -> Path:
    """Write the model into ``directory`` atomically (temp dir + rename); returns the path."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        cfg = model.config.to_dict()
        cfg["weights"] = "trainable" if trainable_only else "all"
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        save_file(_state_for_saving(model, trainable_only), str(tmp / WEIGHTS), metadata={"format": "pt"})
        tok = getattr(model, "tokenizer", None)
        if isinstance(tok, Tokenizer):
            tok.save(tmp / "tokenizer")
        captioner = getattr(model, "captioner", None)  # a CoCa decoder (train --loss coca) rides along
        if captioner is not None:
            captioner.save(tmp / CAPTIONER)
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}.tmp"  # a stale one is cleaned
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def is_saved_model(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def read_saved(directory: str | Path) -> tuple[ModelConfig, Tokenizer | None, bool]:
    """(config, saved tokenizer or None, partial) of a saved dir; partial: only trainable weights."""
    directory = Path(directory)
    if not is_saved_model(directory):
        raise FileNotFoundError(f"{directory} is not a saved clipforge model (needs {CONFIG} + {WEIGHTS})")
    raw = json.loads((directory / CONFIG).read_text())
    tok = Tokenizer.from_dir(directory / "tokenizer") if (directory / "tokenizer").is_dir() else None
    return read_config(directory), tok, raw.get("weights") == "trainable"


def load_weights(model: nn.Module, directory: str | Path, partial: bool) -> None:
    """Fill ``model`` from ``directory``'s safetensors, checking exactly the expected tensors are there."""
    directory = Path(directory)
    sd = load_file(str(directory / WEIGHTS))
    expected = model.state_dict()
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"{directory}: weights not in the model: {unexpected[:5]}")
    missing = sorted(set(expected) - set(sd))
    aliases = _aliases(model)
    missing = [k for k in missing if aliases.get(k) not in sd]
    if missing and not partial:
        raise ValueError(f"{directory}: weights missing from {WEIGHTS}: {missing[:5]}")
    if partial:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        bad = [k for k in missing if k in trainable]
        if bad:
            raise ValueError(f"{directory}: trainable weights missing from {WEIGHTS}: {bad[:5]}")
    model.load_state_dict(sd, strict=False)


def _aliases(model: nn.Module) -> dict[str, str]:
    """state_dict names that share storage with an earlier name (tied weights saved once)."""
    seen, out = {}, {}
    for k, v in model.state_dict().items():
        if not v.numel():
            continue
        ptr = (v.data_ptr(), v.shape, v.dtype)
        if ptr in seen:
            out[k] = seen[ptr]
        else:
            seen[ptr] = k
    return out
