"""Data-parallel evaluation helpers: rank/world, gathering Python objects, rank-0 gating.

Evaluation shards *samples* across ranks (not whole (model, dataset) jobs): each rank embeds its
slice, the slices are gathered with ``all_gather_object`` (embeddings are a few MB), and metrics are
computed from the identical gathered arrays, so 1 and N processes give the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from clipforge.runtime import rank_world


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
    """Every rank's ``obj`` in rank order (just ``[obj]`` outside torch.distributed).

    Under torchrun's environment without a process group each rank would hold only its own slice:
    that is an error (call :func:`init_from_env`), never silently partial results.
    """
    if not is_dist():
        if rank_world()[1] > 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but no torch.distributed process group: call "
                "clipforge.evaluate.dist.init_from_env() before evaluating"
            )
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        torch.distributed.barrier()


__all__ = ["all_gather_object", "barrier", "init_from_env", "is_dist", "is_main", "rank_world"]
