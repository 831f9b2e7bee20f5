"""Distributed plumbing: init from torchrun's env, gradient averaging, FSDP2 sharding, object gathers.

Data parallelism is DDP's contract made explicit: every rank computes gradients on its slice of the
global batch and the gradients are averaged (all-reduce, flattened in buckets) before the optimizer
step. It is done by hand rather than by wrapping in ``DistributedDataParallel`` because the trainer
calls the model's feature/head methods (cached towers, GradCache re-forwards) rather than one
``forward``, which DDP's reducer cannot follow; the arithmetic is identical.

``fsdp=True`` (FSDP2, ``fully_shard``) shards what is big and trained: every fully trainable repeated
layer (the elements of a tower's ``nn.ModuleList``s) and then each fully trainable tower, so their
parameters, gradients and AdamW moments are split over ranks (DTensors), gathered per layer for
the forward and reduce-scattered (averaged) in backward. The root model is not sharded: projection
heads, ``logit_scale``/``logit_bias`` and anything frozen stay plain, replicated tensors, averaged by
:func:`all_reduce_grads` like before (it skips DTensors). Frozen towers and layers stay plain too:
they have no grads or optimizer state to shard, and a locked tower's feature cache is computed on
rank 0 alone, which must not wait on a collective. The world-size-1 case trains unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from clipforge.runtime import rank_world


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = rank_world()  # torchrun's env before the group is up
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    rank, world = rank_world()  # the group's view once it is up
    return DistInfo(rank, world, local, dev)


def all_reduce_grads(params: list[torch.Tensor], world: int, bucket_mb: float = 25.0) -> None:
    """Average ``.grad`` over ranks (a param without a grad contributes zeros, as DDP does).

    FSDP-sharded params (DTensors) were already averaged by FSDP's reduce-scatter in backward: skipped.
    """
    if world <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    params = [p for p in params if not isinstance(p, DTensor)]
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= limit:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


# Where the towers of the three backends live: ``towers:`` (image_tower / text_tower, entered through
# prefix()/rest()), ``hf:`` and ``scratch:`` (transformers CLIPModel/SiglipModel, entered through forward).
TOWER_PATHS = ("image_tower", "text_tower", "hf.vision_model", "hf.text_model")
ENTRY_METHODS = ("prefix", "rest")


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP sharded some of ``model``'s parameters (checkpoints then need collectives)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _fully_trainable(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def repeated_layers(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The elements of the outermost ``nn.ModuleList``s under ``module``: transformer layers, MBConv
    blocks. Found by structure rather than by name, so any HF encoder works. A list registered
    twice (a tower keeping a handle on its encoder's layers) is listed once."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            sub = f"{path}.{name}" if path else name
            if isinstance(child, nn.ModuleList):
                out.extend((f"{sub}.{i}", layer) for i, layer in enumerate(child))
            else:
                walk(child, sub)

    walk(module, prefix)
    return out


def _shard(module: nn.Module, mesh: DeviceMesh) -> None:
    for p in module.parameters():  # FSDP2 refuses non-contiguous params (channels_last convs)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    fully_shard(module, mesh=mesh)


def shard_model(model: nn.Module, device: torch.device) -> list[str]:
    """FSDP2 in place: ``fully_shard`` each fully trainable layer of each tower, then each fully
    trainable tower; returns the names of the sharded modules.

    A partly unlocked tower gets only its trainable layers sharded (its frozen prefix, run under
    no_grad and cached, stays plain). Towers entered through methods other than ``forward``
    (``prefix``/``rest``) have them registered so FSDP gathers parameters for them too.
    """
    mesh = init_device_mesh(device.type, (rank_world()[1],))
    done: list[str] = []
    for path in TOWER_PATHS:
        try:
            tower = model.get_submodule(path)
        except AttributeError:
            continue
        for name, layer in repeated_layers(tower, path):
            if _fully_trainable(layer):
                _shard(layer, mesh)
                done.append(name)
        if _fully_trainable(tower):
            _shard(tower, mesh)
            for method in ENTRY_METHODS:
                if callable(getattr(tower, method, None)):
                    register_fsdp_forward_method(tower, method)
            done.append(path)
    return done


def mean_across(x: float, world: int, device: torch.device) -> float:
    if world <= 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def gather_objects(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: int) -> Any:
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
