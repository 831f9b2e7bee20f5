"""Checkpoints: weights, optimizer, step, RNG states and data positions; atomic; no pickle.

Layout of ``OUTPUT/checkpoints/step-0000100/``::

    model.safetensors    all model weights (state dict; shared tensors handled)
    optimizer.safetensors  every tensor of the optimizer state, keyed ``state.<param idx>.<name>``
    state.json           step, optimizer param groups + non-tensor state, RNG states of every rank
                         (torch as uint8 lists, numpy and python random as JSON), the data position
                         of every rank and worker, the bad-sample report so far, the config
    rng_torch_<rank>.safetensors  torch CPU (and CUDA) generator states

A checkpoint is written into a temp dir and renamed into place, then ``latest`` (a one-line text file)
is atomically replaced: a kill at any moment leaves the previous checkpoint intact and pointed to.

An FSDP run writes the same files: its weights and optimizer state are gathered to full tensors on
rank 0 first (:func:`gather_full_state`, a collective) and the optimizer state is keyed by parameter
index like ``optimizer.state_dict()``, so FSDP and plain runs resume from each other's checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections import defaultdict
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clipforge.train.dist import is_sharded
from clipforge.utils import atomic_path


def rng_state() -> dict[str, Any]:
    """This process's RNG states: JSON-able parts and tensors kept apart (no pickle)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "tensors": tensors,
    }


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    n = json_part["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = json_part["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (``opt.state_dict()`` layout) into tensors (safetensors) and
    everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        plain["state"][str(idx)] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][name] = v
    return tensors, plain


def optimizer_state_dict(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": plain["param_groups"]}


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index ``i`` of ``opt.state_dict()`` is name ``i``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def gather_full_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) weights and optimizer state of an FSDP model, on rank 0's CPU (empty on the
    other ranks). A collective: every rank must call it. The optimizer state is re-keyed from names
    to indices, the layout of a plain ``opt.state_dict()``."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if not weights:  # not rank 0
        return {}, {}
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return weights, {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups}


def _shared_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of names one tensor is registered under (a tower keeping a handle on its encoder's
    layers), in registration order: safetensors' ``save_model`` stores such a tensor once."""
    groups: dict[int, list[str]] = defaultdict(list)
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, t in named:
        groups[id(t)].append(name)
    return [g for g in groups.values() if len(g) > 1]


def _save_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``save_model``'s file from a gathered state dict: shared tensors once, under their first name in
    sorted order, the dropped names in the metadata."""
    dropped = {}
    for group in _shared_names(model):
        keep = min(group)
        dropped.update({n: keep for n in group if n != keep and n in weights})
    tensors = {k: v.contiguous() for k, v in weights.items() if k not in dropped}
    save_file(tensors, str(path), metadata=dropped or None)


def load_sharded(model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path, osd: dict[str, Any]) -> None:
    """Load full weights and an index-keyed optimizer state into an FSDP model (every rank calls it):
    each rank keeps its shard."""
    weights, extra = load_file(str(path)), set()
    for group in _shared_names(model):  # a shared tensor loads through its first registered name
        stored = [n for n in group if n in weights]
        if stored:
            weights[group[0]] = weights.pop(stored[0])
        extra.update(group[1:])
    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(model, weights, options=options)
    missing = set(result.missing_keys) - extra
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: missing keys {sorted(missing)}, unexpected {result.unexpected_keys}")
    names = _param_names(model, opt)
    by_name = {
        "state": {names[i]: v for i, v in osd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, by_name, options=options)


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng_per_rank: list[dict[str, Any]],
    keep: int = 2,
    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``step-XXXXXXX`` atomically and point ``latest`` at it; prune old ones (keep >= 1).

    ``full``: an FSDP model's (weights, optimizer state) from :func:`gather_full_state`, written in
    place of ``model`` / ``optimizer``'s own (sharded) state.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", suffix=".tmp", dir=root))  # cleaned if killed
    try:
        if full is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            _save_full_weights(model, full[0], tmp / "model.safetensors")
        tensors, plain = optimizer_state(optimizer.state_dict() if full is None else full[1])
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng_json = []
        for rank, r in enumerate(rng_per_rank):
            save_file(
                {k: v.contiguous() for k, v in r["tensors"].items()},
                str(tmp / f"rng_torch_{rank}.safetensors"),
            )
            rng_json.append({k: v for k, v in r.items() if k != "tensors"})
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "optimizer": plain, "rng": rng_json}, indent=1, default=str)
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(root / "latest") as t:
        t.write_text(final.name + "\n")
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.startswith("."))
    for p in steps[: max(len(steps) - max(keep, 1), 0)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    pointer = Path(ckpt_root) / "latest"
    if not pointer.exists():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG; return the state dict (step, data positions...).

    Every rank calls it; for an FSDP model it is a collective and each rank keeps its shards.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    osd = optimizer_state_dict(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if is_sharded(model):
        load_sharded(model, optimizer, path / "model.safetensors", osd)
    else:
        load_model(model, str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(osd)
    ranks = state["rng"]
    if rank < len(ranks):
        set_rng_state(ranks[rank], load_file(str(path / f"rng_torch_{rank}.safetensors")))
    return state
