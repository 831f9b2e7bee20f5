"""Data-parallel evaluation helpers: rank/world, gathering Python objects, rank-0 gating.

Evaluation shards *samples* across ranks (not whole (model, dataset) jobs): each rank embeds its
slice, the slices are gathered with ``all_gather_object`` (embeddings are a few MB), and metrics are
computed from the identical gathered arrays, so 1 and N processes give the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    if is_dist():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def init_from_env(backend: str = "gloo") -> bool:
    """Join the process group torchrun describes in the environment (no-op when not under torchrun).

    gloo: evaluation gathers CPU objects; returns True when this process is part of a group.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    torch.distributed.init_process_group(backend=backend)
    return True


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` outside torch.distributed)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        torch.distributed.barrier()
