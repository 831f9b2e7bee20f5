"""Streaming dataset over shards: shard shuffle, shuffle buffer, rank/worker split, exact resume.

Every yielded sample carries its *slot* (``rank * num_workers + worker``), epoch and ordinal ``pos``
in that slot's deterministic stream. The consumer (training loop, evaluator) records the largest
``(epoch, pos)`` per slot from the batches it actually used (:class:`DataPosition`); a resumed
dataset replays each slot's stream and skips what was consumed *before decoding*, so a resumed run
neither repeats nor skips a sample. Skipped bad samples ride along in ``__bad__`` so the main process
counts them even when they were found in a DataLoader worker process.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.decode import DecodeConfig, SkipSample, decode_sample
from clipforge.data.reader import ReadLimits, iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.runtime import die_with_parent, rank_world

Sample = dict[str, Any]


dist_info = rank_world  # old name, kept importable; use clipforge.runtime.rank_world


class _ListReport:
    """Collects (key, reason, detail) tuples; duck-types BadSampleReport.add for the tar reader."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, key: str, reason: str, detail: str = "") -> None:
        self.items.append((key, reason, detail))

    def drain(self) -> list[tuple[str, str, str]]:
        out, self.items = self.items, []
        return out


def shuffle_buffer(stream: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Reservoir-style shuffle buffer (as webdataset's): deterministic for a given ``rng``."""
    if size <= 1:
        yield from stream
        return
    buf: list[Sample] = []
    for s in stream:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


@dataclass
class DataPosition:
    """What the consumer has used: slot -> (epoch, pos). Saved in checkpoints; feeds resume."""

    nslots: int = 0
    slots: dict[int, tuple[int, int]] = field(default_factory=dict)

    def update(self, batch: dict[str, Any]) -> None:
        for slot, ep, pos, n in zip(
            batch["__slot__"], batch["__epoch__"], batch["__pos__"], batch["__nslots__"]
        ):
            slot, ep, pos = int(slot), int(ep), int(pos)
            self.nslots = int(n)
            if (ep, pos) > self.slots.get(slot, (-1, 0)):
                self.slots[slot] = (ep, pos)

    def state_dict(self) -> dict[str, Any]:
        return {"nslots": self.nslots, "slots": {str(k): list(v) for k, v in sorted(self.slots.items())}}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> DataPosition:
        return cls(
            int(d.get("nslots", 0)), {int(k): (int(v[0]), int(v[1])) for k, v in d.get("slots", {}).items()}
        )


class ShardDataset(IterableDataset):
    """Iterate decoded samples from shard specs, split over distributed ranks and DataLoader workers.

    ``split``: ``"shard"`` gives each slot whole shards (needs >= as many shards as slots), ``"sample"``
    gives each slot every n-th sample of every shard, ``"auto"`` picks shard split when possible.
    ``epochs=None`` streams forever (training by steps); ``__epoch__`` tells epochs apart.
    """

    def __init__(
        self,
        shards: str | Iterable[str],
        map_fn: Callable[[Sample], Sample] | None = None,
        *,
        decode: DecodeConfig | None = None,
        epochs: int | None = 1,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        report: BadSampleReport | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        self.decode_cfg = decode or DecodeConfig()
        self.map_fn = map_fn
        self.epochs = epochs
        self.shuffle_shards = shuffle_shards
        self.buffer = shuffle_buffer
        self.seed = seed
        self.split = split
        self._rank, self._world = rank, world_size
        self.report = report if report is not None else BadSampleReport()
        self.resume: DataPosition | None = None
        self.limits = limits  # None: ReadLimits.from_env() in each worker

    # -- resume -------------------------------------------------------------------------------
    def load_position(self, position: DataPosition | dict[str, Any]) -> None:
        self.resume = position if isinstance(position, DataPosition) else DataPosition.from_state(position)

    # -- iteration ----------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        rank, world = rank_world()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        wi = get_worker_info()
        if wi is not None:
            die_with_parent()  # a kill -9 of the command must not leave this worker decoding away
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _epoch_stream(self, epoch: int, slot: int, nslots: int, tar_report: _ListReport) -> Iterator[Sample]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
        by_shard = self.split == "shard" or (self.split == "auto" and len(urls) >= nslots)
        if by_shard:
            mine = urls[slot::nslots]
            stream = itertools.chain.from_iterable(iter_tar_samples(u, tar_report, self.limits) for u in mine)
        else:
            every = itertools.chain.from_iterable(iter_tar_samples(u, tar_report, self.limits) for u in urls)
            stream = (s for i, s in enumerate(every) if i % nslots == slot)
        rng = random.Random(hash((self.seed, epoch, slot)) & 0xFFFFFFFF)
        return shuffle_buffer(stream, self.buffer, rng)

    def _map(self, raw: Sample) -> Sample:
        out = decode_sample(raw, self.decode_cfg)
        return self.map_fn(out) if self.map_fn is not None else out

    def __iter__(self) -> Iterator[Sample]:
        slot, nslots = self._slot()
        start_epoch, skip = 0, 0
        if self.resume is not None and self.resume.slots:
            if self.resume.nslots != nslots:
                raise ValueError(
                    f"cannot resume exactly: checkpoint has {self.resume.nslots} data slots (ranks x workers), "
                    f"this run has {nslots}; use the same world size and --workers"
                )
            start_epoch, skip = self.resume.slots.get(slot, (0, 0))
        tar_report = _ListReport()
        pending: list[tuple[str, str, str]] = []
        epochs = itertools.count(start_epoch) if self.epochs is None else range(start_epoch, self.epochs)
        for epoch in epochs:
            n_yielded = 0
            for pos, raw in enumerate(self._epoch_stream(epoch, slot, nslots, tar_report), 1):
                if epoch == start_epoch and pos <= skip:
                    tar_report.drain()  # already reported before the checkpoint
                    continue
                pending.extend(tar_report.drain())
                try:
                    out = self._map(raw)
                except SkipSample as e:
                    pending.append((raw["__key__"], e.reason, e.detail))
                    continue
                except Exception as e:  # a bug in a user map_fn must not kill a long run silently
                    pending.append((raw["__key__"], "map_error", f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                out.update(__slot__=slot, __nslots__=nslots, __epoch__=epoch, __pos__=pos, __bad__=pending)
                for k, r, d in pending:
                    self.report.add(k, r, d)
                pending = []
                n_yielded += 1
                yield out
            pending.extend(tar_report.drain())
            if self.epochs is None and n_yielded == 0 and not (epoch == start_epoch and skip):
                raise RuntimeError(f"data slot {slot}/{nslots} produced no samples in epoch {epoch}")
        if pending:  # bad samples after the last good one still reach the consumer's report
            for k, r, d in pending:
                self.report.add(k, r, d)
            yield {"__only_bad__": True, "__bad__": pending}


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Batch samples: tensors stacked, ints -> LongTensor, the rest as lists; ``__bad__`` concatenated.

    A batch can be empty (only bad-sample records): check ``batch["size"]``.
    """
    bad = [b for s in samples for b in s.get("__bad__", [])]
    good = [s for s in samples if not s.get("__only_bad__")]
    out: dict[str, Any] = {"__bad__": bad, "size": len(good)}
    if not good:
        return out
    for k in good[0]:
        if k == "__bad__":
            continue
        vals = [s[k] for s in good]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, bool)) and k not in ("__slot__", "__epoch__", "__pos__", "__nslots__"):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def record_bad(batch: dict[str, Any], report: BadSampleReport) -> None:
    """Merge a batch's bad-sample records into the main process's report."""
    for k, r, d in batch.get("__bad__", []):
        report.add(k, r, d)
