"""Where training batches come from: streaming shards, or cached features held in memory.

Streaming (a trained image tower): :class:`ShardDataset` streams forever (``epochs=None``; the epoch
is read off each sample), DataLoader workers decode and augment, and each rank loads its share of the
global batch. Augmentation and the caption picked per sample are seeded by (seed, epoch, key), and
batches are re-sequenced in worker round-robin order, so a resumed run sees exactly what the
uninterrupted run would have.

Cached (a locked image tower): a deterministic permutation of all cached samples per epoch; step
``s`` takes slice ``s`` of it as the GLOBAL batch and each rank its contiguous part, so the global
batch is identical for any world size and resuming needs only the step.

Both take the caption(s) of each sample from the run's text source (:mod:`clipforge.train.textsource`:
shard captions, side-table synthetic captions, mixes, rewrites, several positives), chosen by
(seed, epoch, key) as well.
"""

from __future__ import annotations

import random
import tarfile
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from clipforge.data.dataset import DataPosition, ShardDataset, collate
from clipforge.data.decode import DecodeConfig
from clipforge.data.reader import split_member_name
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import is_remote, open_shard, shard_name
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.runtime import worker_start_method
from clipforge.train.textsource import TextChooser


def shard_keys(urls: list[str]) -> list[tuple[str, str]]:
    """(shard name, key) of every sample, from a header-only tar scan (no member data is read locally)."""
    out: list[tuple[str, str]] = []
    for url in urls:
        keys: dict[str, None] = {}
        try:
            if is_remote(url):
                with open_shard(url) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                    names = [m.name for m in tf if m.isfile()]
            else:
                with tarfile.open(url.removeprefix("file://"), mode="r:*") as tf:
                    names = [m.name for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError, EOFError):
            continue  # the data layer reports unreadable shards when the run reads them
        for n in names:
            parts = split_member_name(n)
            if parts:
                keys[parts[0]] = None
        name = shard_name(url)
        out += [(name, k) for k in keys]
    return out


def count_samples(urls: list[str]) -> int:
    """Samples in the shards from a header-only tar scan (no member data is read for local files)."""
    return len(shard_keys(urls))


def pick_captions(captions: list[str], k: int, seed: int, epoch: int, key: str) -> list[str]:
    """``k`` captions of a sample for this epoch, deterministically (same on resume, new each epoch)."""
    rng = random.Random(f"{seed}:{epoch}:{key}")
    start = rng.randrange(len(captions))
    return [captions[(start + j) % len(captions)] for j in range(k)]


class _EpochDataset(ShardDataset):
    """ShardDataset whose map function also receives the epoch (for per-epoch seeded randomness)."""

    def _epoch_stream(self, epoch: int, slot: int, nslots: int, tar_report: Any):
        self._epoch_now = epoch  # called at the start of each epoch, before its samples are mapped
        return super()._epoch_stream(epoch, slot, nslots, tar_report)

    def _map(self, raw: dict[str, Any]) -> dict[str, Any]:
        from clipforge.data.decode import decode_sample

        return self.map_fn(decode_sample(raw, self.decode_cfg), self._epoch_now)  # type: ignore[misc]


class TrainSampleMap:
    """Decoded sample -> {"key", "pixels", "texts"(, "weight")}: seeded augmentation and caption choice.

    ``chooser`` (:class:`~clipforge.train.textsource.TextChooser`): the run's text source (side-table
    captions, mix, multi, rewrites); ``None`` or ``raw`` is the shard's captions as before."""

    def __init__(
        self,
        preprocess: dict,
        augment: bool,
        n_captions: int,
        seed: int,
        all_captions: bool,
        chooser: TextChooser | None = None,
    ):
        self.cfg = PreprocessConfig.from_dict(preprocess)
        self.augment, self.k, self.seed, self.all_captions = augment, n_captions, seed, all_captions
        self.eval_tf = ImageTransform(self.cfg, train=False)
        self.chooser = chooser

    def __call__(self, s: dict[str, Any], epoch: int) -> dict[str, Any]:
        if self.augment:
            tf = ImageTransform(self.cfg, train=True, seed=None)
            tf.rng = random.Random(f"aug:{self.seed}:{epoch}:{s['key']}")
            pixels = tf(s["image"])
        else:
            pixels = self.eval_tf(s["image"])
        caps = s["captions"] if self.all_captions else [s["caption"]]
        texts = pick_captions(caps, self.k, self.seed, epoch, s["key"])
        out = {"key": s["key"], "pixels": pixels, "texts": texts}
        if self.chooser is not None:
            out["texts"] = self.chooser.choose(texts, caps, s["key"], s.get("shard", ""), epoch)
            if self.chooser.weighted:
                out["weight"] = self.chooser.weight(s["key"], s.get("shard", ""))
        return out


class RoundRobin:
    """Re-sequence a DataLoader's batches to continue the worker round-robin at ``start``.

    A DataLoader always starts at worker 0; after resuming at loader batch ``b`` the uninterrupted run
    would next have taken worker ``b % workers``. Batches are tagged with their slot, so we hold the
    early workers' batches back until their turn (at most ``workers`` batches buffered).
    """

    def __init__(self, loader: DataLoader, workers: int, start: int, slot_base: int):
        self.it, self.n, self.next, self.base = (
            iter(loader),
            max(workers, 1),
            start % max(workers, 1),
            slot_base,
        )
        self.queues: dict[int, deque] = {w: deque() for w in range(self.n)}

    def __iter__(self) -> RoundRobin:
        return self

    def __next__(self) -> dict[str, Any]:
        want = self.next
        while not self.queues[want]:
            b = next(self.it)
            w = int(b["__slot__"][0]) - self.base if b.get("size") else want
            self.queues[w].append(b)
        self.next = (want + 1) % self.n
        return self.queues[want].popleft()


class StreamingBatches:
    """Per-rank batches decoded from shards; tracks the consumed :class:`DataPosition` for checkpoints."""

    def __init__(
        self,
        urls: list[str],
        local_batch: int,
        sample_map: TrainSampleMap,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        *,
        rank: int,
        world: int,
        workers: int,
        shuffle_buffer: int,
        seed: int,
        report: BadSampleReport,
        position: dict | None = None,
        loader_batches: int = 0,
    ):
        self.ds = _EpochDataset(
            urls,
            sample_map,
            decode=DecodeConfig(image=True, caption=True),
            epochs=None,
            shuffle_shards=True,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            rank=rank,
            world_size=world,
            report=report,
        )
        if position:
            self.ds.load_position(position)
        self.position = DataPosition.from_state(position) if position else DataPosition()
        self.tokenize, self.report, self.rank = tokenize, report, rank
        self.loader_batches = loader_batches
        loader = DataLoader(
            self.ds,
            batch_size=local_batch,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
            multiprocessing_context=worker_start_method() if workers else None,
        )
        self.batches = RoundRobin(loader, workers, loader_batches, rank * max(workers, 1))
        self.epoch = 0

    def next(self) -> dict[str, Any]:
        while True:
            b = next(self.batches)
            self.loader_batches += 1
            for k, r, d in b.get("__bad__", []):
                self.report.add(k, r, d)
            if b["size"]:
                break
        self.position.update(b)
        self.epoch = max(int(e) for e in b["__epoch__"])
        texts = [t for ts in b["texts"] for t in ts]
        k = len(b["texts"][0])
        out = {
            "keys": list(b["key"]),
            "captions": [ts[0] for ts in b["texts"]],  # one per image (the CoCa decoder's target)
            "texts": texts,  # all of them, k per image in order
            "image": {"pixels": b["pixels"]},
            "text": dict(self.tokenize(texts)),
            "image_cached": False,
            "text_cached": False,
            "img_ids": None,
            "txt_ids": None,
        }
        if "weight" in b:
            out["weights"] = torch.tensor(b["weight"], dtype=torch.float32)
        if k > 1:  # multi-positive: group ids unique across ranks
            base = self.rank * 1_000_000_000
            out["img_ids"] = base + torch.arange(b["size"])
            out["txt_ids"] = base + torch.arange(b["size"]).repeat_interleave(k)
        return out

    def state(self) -> dict[str, Any]:
        return {"position": self.position.state_dict(), "loader_batches": self.loader_batches}


class CachedBatches:
    """Global batches from an in-memory :class:`~clipforge.train.cache.CachedData`, split across ranks."""

    def __init__(
        self,
        data: Any,
        global_batch: int,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        *,
        rank: int,
        world: int,
        seed: int,
        n_captions: int,
        all_captions: bool,
        chooser: TextChooser | None = None,
    ):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by world size {world}")
        if len(data) < global_batch:
            raise ValueError(f"only {len(data)} cached samples, fewer than one batch of {global_batch}")
        self.data, self.gb, self.tokenize = data, global_batch, tokenize
        self.rank, self.world, self.seed, self.k, self.all_captions = (
            rank,
            world,
            seed,
            n_captions,
            all_captions,
        )
        self.steps_per_epoch = len(data) // global_batch
        self._perm_epoch, self._perm, self._choice = -1, None, None
        self.chooser = chooser if chooser is not None and chooser.source.mode != "raw" else None
        self.weigher = chooser if chooser is not None and chooser.weighted else None

    def _epoch_tables(self, epoch: int) -> None:
        if epoch == self._perm_epoch:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(len(self.data), generator=g)
        ncap = self.data.caption_counts if self.all_captions else torch.ones(len(self.data), dtype=torch.long)
        self._choice = (torch.rand(len(self.data), generator=g) * ncap).long()
        self._perm_epoch = epoch

    def batch(self, step: int) -> dict[str, Any]:
        epoch, off = divmod(step, self.steps_per_epoch)
        self._epoch_tables(epoch)
        per = self.gb // self.world
        start = off * self.gb + self.rank * per
        idx = self._perm[start : start + per]
        first = self._choice[idx]
        ncap = self.data.caption_counts[idx] if self.all_captions else torch.ones_like(idx)
        cap_rows = torch.stack([(first + j) % ncap for j in range(self.k)], 1)  # [per, k] caption index
        out: dict[str, Any] = {
            "keys": [self.data.keys[i] for i in idx.tolist()],
            "captions": [self.data.captions[i][int(r[0])] for i, r in zip(idx.tolist(), cap_rows)],
            "epoch": epoch,
            "image": self.data.image_rows(idx),
            "image_cached": True,
            "img_ids": None,
            "txt_ids": None,
        }
        if self.chooser is not None:
            self._side_texts(out, idx, cap_rows, epoch)
        elif self.data.text_cached:
            out["text"] = self.data.text_rows(idx, cap_rows)
            out["text_cached"] = True
        else:
            texts = [self.data.captions[i][int(c)] for i, row in zip(idx.tolist(), cap_rows) for c in row]
            out["text"] = dict(self.tokenize(texts))
            out["text_cached"] = False
        if self.weigher is not None:
            sh = self.data.shards or [""] * len(self.data)
            ws = [self.weigher.weight(self.data.keys[i], sh[i]) for i in idx.tolist()]
            out["weights"] = torch.tensor(ws, dtype=torch.float32)
        if self.k > 1:
            out["img_ids"] = idx.clone()
            out["txt_ids"] = idx.repeat_interleave(self.k)
        return out

    def _side_texts(self, out: dict[str, Any], idx: torch.Tensor, cap_rows: torch.Tensor, epoch: int) -> None:
        """The text source's captions (raw picks as ``raw`` would make them, then the chooser's choice)."""
        d, texts, rows = self.data, [], []
        for i, r in zip(idx.tolist(), cap_rows):
            raw_all = d.captions[i] if self.all_captions else d.captions[i][:1]
            picked = [raw_all[int(c)] for c in r]
            chosen = self.chooser.choose(picked, raw_all, d.keys[i], d.shards[i] if d.shards else "", epoch)
            texts += chosen
            if d.text_cached:
                rows += [d.text_row(i, t) for t in chosen]
        out["captions"], out["texts"] = texts[:: self.k], texts
        if d.text_cached:
            out["text"] = d.text_rows_at(torch.tensor(rows, dtype=torch.long))
            out["text_cached"] = True
        else:
            out["text"] = dict(self.tokenize(texts))
            out["text_cached"] = False
