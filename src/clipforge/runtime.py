"""Process resources: how many CPUs we really have, and an allocator that does not feed the kernel.

Why: on our own eval ``/usr/bin/time -v`` showed half the CPU time in the kernel. glibc returns every
large tensor (> its mmap threshold) to the OS on free and page-faults it back in on the next forward
pass. :func:`tune_allocator` keeps freed memory in the process instead, for this process (``mallopt``)
and, through the environment, for every child (DataLoader workers, torchrun ranks, Ray actors, the
server). Call :func:`setup_process` once at start-up; the CLI does.

CPUs: ``os.cpu_count()`` is the host's count, not what a container or a taskset lets us use. We take
the minimum of the affinity mask and the cgroup quota (``cpu.max``), so threads and workers are sized
to the CPUs really available on a shared machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from pathlib import Path

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8

# Values measured on CIFAR eval, index build, curate and the quickstart (README "Kernel time"): never
# mmap a chunk (M_MMAP_MAX=0): a convnet activation above glibc's 32 MiB threshold cap would otherwise
# be mmapped, zeroed by the kernel and unmapped on every forward pass (eval of 2,000 CIFAR images, idle:
# kernel 41.2 s -> 1.4 s of CPU). Keep freed heap: trim only above 2 GiB of free top, and then keep
# 2 GiB (TOP_PAD). mallopt takes an int, so 2 GiB - 1 is the most it can set: the 4 GiB asked for
# before was silently cut to 2 GiB while TOP_PAD stayed 1 GiB, and a forward pass whose activations
# peak above 1 GiB (the quickstart's feature pass, batch 128 at 224 px: ~1.2 GiB) grew the heap by
# brk, was trimmed back after the batch and page-faulted it all in again: 190k faults per batch.
# (torch's THP_MEM_ALLOC_ENABLE made it worse here: 10.1 s vs 5.2 s of kernel time; huge-page zeroing.)
_INT_MAX = 2**31 - 1
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX),
    "MALLOC_TOP_PAD_": str(_INT_MAX),
    "MALLOC_MMAP_MAX_": "0",
    # one arena: a worker thread's arena is a 64 MiB mmapped heap that glibc shrinks and unmaps as it
    # empties (curate's shard threads, the server's model thread): curate kernel 18.6 s -> 1.6 s
    "MALLOC_ARENA_MAX": "1",
}


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 cfs files), or None when unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may really use: min(affinity mask, cgroup quota), at least 1.

    ``CLIPFORGE_CPUS`` overrides it (e.g. to leave cores to a server on the same machine).
    """
    env = os.environ.get("CLIPFORGE_CPUS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def default_workers(reserve: int = 1, cap: int = 8) -> int:
    """Decode workers that fit beside the compute threads: available CPUs - ``reserve``, in [0, cap]."""
    return max(0, min(cap, available_cpus() - reserve))


def worker_start_method() -> str | None:
    """How DataLoader workers start: ``"forkserver"`` once this process has loaded Ray's core worker,
    else None (the platform default, ``fork``).

    Why: Ray's gRPC and event-engine threads outlive ``ray.shutdown()``, and a ``fork()`` of a process
    with foreign native threads can copy a lock another thread holds; the worker then blocks forever
    and the loader waits on it (a test run hung this way after the Ray tests). A fork server is forked
    before any of those threads exist. ``CLIPFORGE_WORKER_START`` (fork | forkserver | spawn) overrides.
    """
    method = os.environ.get("CLIPFORGE_WORKER_START") or ("forkserver" if "ray._raylet" in sys.modules else None)
    if method not in (None, "fork", "forkserver", "spawn"):
        raise ValueError(f"CLIPFORGE_WORKER_START={method!r}: one of fork, forkserver, spawn")
    if method == "forkserver":  # the server dies with this process (a kill -9 leaves no workers behind)
        import multiprocessing

        multiprocessing.set_forkserver_preload(["__main__", "clipforge.forkserver_guard"])
    return method


def tune_allocator(children: bool = True) -> bool:
    """Keep freed memory in-process (glibc ``mallopt``); export the same settings to child processes.

    Returns True when mallopt was applied (glibc present). Safe to call more than once. A user's own
    ``MALLOC_*`` environment settings win over ours.
    """
    if os.environ.get("CLIPFORGE_MALLOC", "1") == "0":
        return False
    if children:
        for k, v in ALLOCATOR_ENV.items():
            os.environ.setdefault(k, v)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = True
    for param, env in (
        (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
        (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
        (_M_TOP_PAD, "MALLOC_TOP_PAD_"),
        (_M_MMAP_MAX, "MALLOC_MMAP_MAX_"),
        (_M_ARENA_MAX, "MALLOC_ARENA_MAX"),
    ):
        value = int(os.environ.get(env, ALLOCATOR_ENV[env]))
        ok &= bool(mallopt(param, min(value, _INT_MAX)))  # a user's larger env value: the most mallopt takes
    return ok


def setup_process(threads: int | None = None) -> int:
    """Allocator tuning + torch intra-op threads sized to the available CPUs; returns the thread count."""
    tune_allocator()
    return setup_torch_threads(threads)


def setup_torch_threads(threads: int | None = None) -> int:
    """Intra-op threads: ``threads``, else ``CLIPFORGE_THREADS``, else the CPUs really available."""
    import torch

    n = threads or int(os.environ.get("CLIPFORGE_THREADS", 0)) or available_cpus()
    torch.set_num_threads(n)
    return n


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: from the process group when one is up, else torchrun's env.

    The one place that answers "which rank am I" (data sharding, eval gather, training, losses).
    """
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return tdist.get_rank(), tdist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    DataLoader workers call it at start so a ``kill -9`` of the command leaves no orphan decoding away.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
