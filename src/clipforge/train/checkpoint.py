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
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

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


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (safetensors) and everything else (JSON)."""
    sd = opt.state_dict()
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


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng_per_rank: list[dict[str, Any]],
    keep: int = 2,
) -> Path:
    """Write ``step-XXXXXXX`` atomically and point ``latest`` at it; prune old ones (keep >= 1)."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, plain = optimizer_state(optimizer)
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
    """Restore weights, optimizer and this rank's RNG; return the state dict (step, data positions...)."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), strict=True)
    state = json.loads((path / "state.json").read_text())
    load_optimizer_state(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    ranks = state["rng"]
    if rank < len(ranks):
        set_rng_state(ranks[rank], load_file(str(path / f"rng_torch_{rank}.safetensors")))
    return state
