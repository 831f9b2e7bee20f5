"""Locked-tower feature cache: run frozen towers once over the shards, train heads from disk.

When ``model.image_locked`` (and/or ``text_locked``) the frozen prefix's output never changes, so it
is computed once per shard and stored as float16 safetensors under a fingerprint of everything that
could change it: model spec + options, the frozen parameters themselves, the preprocessing config
and context length. Any change gives a new fingerprint (a new cache); the same model on the same
shards reuses the files across runs. One file per shard holds image features, text features of ALL
captions of each sample (flattened, with offsets) and, in its metadata, the sample keys, captions,
a digest of each sample's image bytes and the bad samples found while caching (so reruns report the
same counts).

Shards made from other shards (``curate filter``/``curate fix``/``reshard`` write the same image bytes
under new captions) are assembled from the cached rows of identical images instead of running the
tower again (:func:`reuse_shard`): training on a curated set after curating it costs a read, not a
second pass over the images.

Random augmentation is OFF for a cached tower: features come from the eval preprocessing.
The pass is made fast by DataLoader workers for decoding, large inference batches under
``torch.inference_mode``, and captions sorted by length so batches carry little padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from clipforge.data.decode import DecodeConfig, decode_sample, find_image
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import shard_name
from clipforge.data.skip import SkipSample
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.models import encode
from clipforge.models.base import ClipModel
from clipforge.utils import atomic_path

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def fingerprint(model: ClipModel, text: bool) -> str:
    """Cache key: the one model identity over the frozen weights + config (which holds spec, options,
    preprocessing and context length; :func:`clipforge.models.encode.fingerprint`), the cache format
    version and whether text features are cached too."""
    meta = {"v": CACHE_VERSION, "text": text, "model": encode.fingerprint(model, frozen_only=True)}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding other dims to the max (sequence features of any length)."""
    if not parts:
        return torch.empty(0)
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    out = []
    for p in parts:
        pad: list[int] = []
        for d in reversed(range(1, p.ndim)):
            pad += [0, shape[d - 1] - p.shape[d]]
        out.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(out)


@dataclass
class CachedData:
    """All cached samples in memory: image features [N, ...], text features [M, ...] + offsets."""

    keys: list[str]
    captions: list[list[str]]
    image: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor] | None = None
    text_offsets: torch.Tensor | None = None  # [N + 1]
    bad: dict[str, Any] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # shard name of each sample (side-table lookups)
    extra_rows: dict[str, int] = field(default_factory=dict)  # side-table text -> its row in ``text``

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def caption_counts(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.captions], dtype=torch.long)

    @property
    def text_cached(self) -> bool:
        return self.text is not None

    def image_rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: _to_compute(v[idx]) for k, v in self.image.items()}

    def text_rows(self, idx: torch.Tensor, cap: torch.Tensor) -> dict[str, torch.Tensor]:
        """Text features of caption ``cap[i, j]`` of sample ``idx[i]``, flattened to [len(idx) * k, ...]."""
        assert self.text is not None and self.text_offsets is not None
        rows = (self.text_offsets[idx].unsqueeze(1) + cap).reshape(-1)
        return {k: _to_compute(v[rows]) for k, v in self.text.items()}

    def text_row(self, i: int, text: str) -> int:
        """Row in ``text`` of caption ``text`` of sample ``i``: its own cached caption, else a side-table text."""
        assert self.text_offsets is not None
        caps = self.captions[i]
        if text in caps:
            return int(self.text_offsets[i]) + caps.index(text)
        return self.extra_rows[text]

    def text_rows_at(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.text is not None
        return {k: _to_compute(v[rows]) for k, v in self.text.items()}


def caption_offsets(captions: list[list[str]]) -> torch.Tensor:
    """[N + 1] start of each sample's captions in the flattened text rows (the last entry: their total)."""
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _to_compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


class _CachePrepare(encode.Prepare):
    """Worker-side: decoded sample -> eval-preprocessed pixels + all captions (main caption first)."""

    def __init__(self, preprocess: dict) -> None:
        super().__init__(ImageTransform(PreprocessConfig.from_dict(preprocess), train=False))

    def __call__(self, s: dict[str, Any]) -> dict[str, Any]:
        caps = [s["caption"]] + [c for c in s["captions"] if c != s["caption"]]
        return {"pixels": self.pixels(s["image"]), "key": s["key"], "shard": s["shard"], "captions": caps}


def _shard_file(root: Path, url: str) -> Path:
    """Cache file of one shard: keyed by its URL and, for a local file, its size and mtime, so a shard
    rewritten at the same path gets new features instead of stale ones. A local path is made absolute
    (and ``file://`` dropped) before hashing: ``shards/a.tar`` run from ``/x`` and ``/x/shards/a.tar``
    are the same file and share one cache entry (an absolute path keys as it always did)."""
    ident = url
    local = _local_file(url)
    if local is not None:
        st = local.stat()
        ident = f"{os.path.abspath(local)}|{st.st_size}|{st.st_mtime_ns}"
    return root / f"{shard_name(url)}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}.safetensors"


def _local_file(url: str) -> Path | None:
    local = Path(url.removeprefix("file://"))
    if "://" not in url.replace("file://", "") and not url.startswith("pipe:") and local.is_file():
        return local
    return None


STALE_TMP_S = 600.0  # a shard file is written in seconds: an older .tmp is a killed run's leftover


def clean_stale_tmp(root: Path, min_age_s: float = STALE_TMP_S) -> int:
    """Remove ``*.tmp`` files a killed run left in a cache dir. The dir is shared across runs, so a
    young ``.tmp`` may belong to a live writer and is kept; returns how many were removed."""
    n = 0
    for p in root.glob("*.tmp") if root.is_dir() else ():
        try:
            if time.time() - p.stat().st_mtime >= min_age_s:
                p.unlink()
                n += 1
        except FileNotFoundError:  # its writer finished (renamed it) meanwhile
            pass
    if n:
        log.info("feature cache %s: removed %d stale .tmp file(s)", root, n)
    return n


def image_digest(data: bytes) -> str:
    """Identity of an image for reuse across shards: its bytes (a re-encoded image is a new image)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def scan_shard(url: str) -> dict[str, Any]:
    """Keys, captions (as the cache pass orders them) and image digests of a local shard, read without
    decoding images. ``clean`` is False when anything would make the real pass report a bad sample (a
    truncated shard, a missing image or caption, a duplicate key): such a shard is never assembled
    from other shards' rows, it takes the full pass and its reports. A remote shard is not scanned (a
    second download costs more than it saves): it is neither assembled nor a source."""
    if _local_file(url) is None:
        return {"keys": [], "captions": [], "digests": [], "clean": False}
    report = BadSampleReport()
    keys: list[str] = []
    captions: list[list[str]] = []
    digests: list[str | None] = []
    clean = True
    for raw in iter_tar_samples(url, report):
        img = find_image(raw)
        digests.append(image_digest(img) if img is not None else None)
        keys.append(raw["__key__"])
        try:
            s = decode_sample(raw, DecodeConfig(image=False, caption=True))
            captions.append([s["caption"]] + [c for c in s["captions"] if c != s["caption"]])
        except SkipSample:
            captions.append([])
            clean = False
    clean = clean and not report.total and None not in digests and len(set(keys)) == len(keys)
    return {"keys": keys, "captions": captions, "digests": digests, "clean": clean}


def digest_index(root: Path) -> dict[str, tuple[Path, int]]:
    """Image digest -> (cache file, row) over every shard file of one cache dir (metadata reads only)."""
    index: dict[str, tuple[Path, int]] = {}
    for path in sorted(root.glob("*.safetensors")) if root.is_dir() else ():
        try:
            with safe_open(str(path), framework="pt") as f:
                digests = json.loads((f.metadata() or {}).get("digests", "[]"))
        except Exception:  # a side-text file, or a file another run is replacing: not a source
            continue
        for row, d in enumerate(digests):
            if d is not None:
                index.setdefault(d, (path, row))
    return index


def reuse_shard(
    scan: dict[str, Any],
    index: dict[str, tuple[Path, int]],
    model: ClipModel,
    *,
    cache_text: bool,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> dict[str, Any] | None:
    """A shard's cache entry from the cached rows of identical images (the frozen prefixes are
    functions of the image bytes and of the caption string alone). Captions are the shard's own: one
    its source row already holds keeps that row's text features, a new one (a recaption) is encoded.
    None when any image is new: the shard then takes the full pass."""
    if not scan["clean"] or not scan["keys"] or any(d not in index for d in scan["digests"]):
        return None
    n = len(scan["keys"])
    flat = [c for caps in scan["captions"] for c in caps]
    offsets = caption_offsets(scan["captions"])
    image: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    have = torch.zeros(len(flat), dtype=torch.bool)  # text rows copied from a source
    by_file: dict[Path, list[tuple[int, int]]] = {}  # source file -> (row in this shard, row there)
    for i, d in enumerate(scan["digests"]):
        path, row = index[d]
        by_file.setdefault(path, []).append((i, row))

    def put(out: dict[str, torch.Tensor], k: str, t: torch.Tensor, rows: int, dst, src) -> None:
        """out[k][dst] = t[src]; sequence features of another length are zero-padded (as cat_padded)."""
        if k not in out:
            out[k] = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
        if out[k].shape[1:] != t.shape[1:]:
            out[k] = cat_padded([out[k], t[:0]])
            t = cat_padded([out[k][:0], t])
        out[k][dst] = t[src].to(out[k].dtype)

    for path, pairs in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            dst, src = torch.tensor([i for i, _ in pairs]), torch.tensor([r for _, r in pairs])
            for name in (k for k in names if k.startswith("image.")):
                put(image, name[6:], f.get_tensor(name), n, dst, src)
            if not cache_text or "text_offsets" not in names:
                continue
            src_caps = json.loads((f.metadata() or {})["captions"])
            src_off = f.get_tensor("text_offsets")
            tdst, tsrc = [], []
            for i, r in pairs:
                for j, c in enumerate(scan["captions"][i]):
                    if c in src_caps[r]:
                        tdst.append(int(offsets[i]) + j)
                        tsrc.append(int(src_off[r]) + src_caps[r].index(c))
            if tdst:
                rows, at = torch.tensor(tdst), torch.tensor(tsrc)
                for name in (k for k in names if k.startswith("text.")):
                    put(text, name[5:], f.get_tensor(name), len(flat), rows, at)
                have[rows] = True
    sh: dict[str, Any] = {
        "keys": scan["keys"], "captions": scan["captions"], "image": image, "digests": scan["digests"],
        "bad": BadSampleReport().to_dict(), "text": None, "text_offsets": None,
    }  # fmt: skip
    if cache_text:
        new = torch.nonzero(~have).flatten().tolist()
        fresh = _encode_texts(model, [flat[i] for i in new], batch_size, device, progress) if new else {}
        for k, v in fresh.items():
            put(text, k, _store(v), len(flat), torch.tensor(new), torch.arange(len(new)))
        sh["text"], sh["text_offsets"] = text, offsets
    return sh


def _load_shard(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {
        "keys": json.loads(meta["keys"]),
        "captions": json.loads(meta["captions"]),
        "bad": json.loads(meta.get("bad", "{}")),
        "image": {k[6:]: v for k, v in tensors.items() if k.startswith("image.")},
        "text": {k[5:]: v for k, v in tensors.items() if k.startswith("text.")} or None,
        "text_offsets": tensors.get("text_offsets"),
    }


@torch.inference_mode()
def _encode_texts(model: ClipModel, captions: list[str], batch: int, device: torch.device, progress: bool):
    """text_features of every caption, in input order; batches sorted by length to cut padding."""
    order = encode.length_sorted(captions)
    parts: list[dict[str, torch.Tensor]] = []
    with encode.eval_mode(model):
        for s in tqdm(range(0, len(order), batch), desc="cache text", disable=not progress, leave=False):
            idx = order[s : s + batch]
            toks = {k: v.to(device) for k, v in model.tokenize([captions[i] for i in idx]).items()}
            parts.append({k: v.cpu() for k, v in model.text_features(toks).items()})
    if not parts:
        return {}
    sorted_feats = {k: cat_padded([p[k] for p in parts]) for k in parts[0]}
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return {k: v[inv] for k, v in sorted_feats.items()}


def compute_shards(
    model: ClipModel,
    urls: list[str],
    *,
    cache_text: bool,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """One pass over ``urls`` (the one shard loop, frozen prefix only): image features, all captions
    (and their text features). The model runs on its own device (``device`` moves the text tokens)."""
    per_shard: dict[str, dict[str, Any]] = {}
    by_name = {shard_name(u): u for u in urls}
    bad_by_shard: dict[str, BadSampleReport] = {}
    batches = encode.encode_shards(
        model, urls, prepare=_CachePrepare(model.config.preprocess),
        decode=DecodeConfig(image=True, caption=True), batch_size=batch_size, workers=workers,
        features=True, prefetch=2,
    )  # fmt: skip
    for b in tqdm(batches, desc="cache images", unit="batch", disable=not progress):
        for k, r, d in b.bad:  # shard-level records name their shard; others go to the first
            url = by_name.get(k.split(":")[0].split("/")[0], urls[0])
            bad_by_shard.setdefault(url, BadSampleReport()).add(k, r, d)
        if not b.keys:
            continue
        rows_of: dict[str, list[int]] = {}
        for i, name in enumerate(b.fields["shard"]):
            rows_of.setdefault(by_name[name], []).append(i)
        for url, rows in rows_of.items():  # one slice per (batch, shard), not one tensor per sample
            sh = per_shard.setdefault(url, {"keys": [], "captions": [], "image": []})
            sel = torch.tensor(rows)
            sh["keys"].extend(b.keys[i] for i in rows)
            sh["captions"].extend(b.fields["captions"][i] for i in rows)
            sh["image"].append({k: v if len(rows) == len(b) else v[sel] for k, v in b.features.items()})
    out: dict[str, dict[str, Any]] = {}
    for url in urls:
        sh = per_shard.get(url, {"keys": [], "captions": [], "image": []})
        image = {k: cat_padded([r[k] for r in sh["image"]]) for k in (sh["image"][0] if sh["image"] else {})}
        out[url] = {
            "keys": sh["keys"],
            "captions": sh["captions"],
            "image": image,
            "bad": bad_by_shard.get(url, BadSampleReport()).to_dict(),
            "text": None,
            "text_offsets": None,
        }
    if cache_text:
        flat = [c for url in urls for caps in out[url]["captions"] for c in caps]
        feats = _encode_texts(model, flat, batch_size, device, progress)
        pos = 0
        for url in urls:
            offsets = caption_offsets(out[url]["captions"])
            n = int(offsets[-1])
            out[url]["text"] = {k: v[pos : pos + n] for k, v in feats.items()}
            out[url]["text_offsets"] = offsets
            pos += n
    return out


def _save_shard(path: Path, sh: dict[str, Any]) -> None:
    tensors = {f"image.{k}": _store(v) for k, v in sh["image"].items()}
    if sh["text"] is not None:
        tensors.update({f"text.{k}": _store(v) for k, v in sh["text"].items()})
        tensors["text_offsets"] = sh["text_offsets"]
    meta = {
        "keys": json.dumps(sh["keys"]),
        "captions": json.dumps(sh["captions"]),
        "bad": json.dumps(sh["bad"]),
        "digests": json.dumps(sh.get("digests") or [None] * len(sh["keys"])),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _store(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16) if t.is_floating_point() else t


def load_or_build_cache(
    model: ClipModel,
    urls: list[str],
    cache_root: str | Path,
    *,
    batch_size: int = 128,
    workers: int = 2,
    device: torch.device | None = None,
    report: BadSampleReport | None = None,
    progress: bool = True,
) -> tuple[CachedData, Path]:
    """Features for every sample of ``urls``: computed for missing shards, read for the rest."""
    if not model.image_locked:
        raise ValueError("the feature cache needs a locked image tower (model.image_locked)")
    device = device or torch.device("cpu")
    cache_text = bool(model.text_locked)
    root = Path(cache_root) / fingerprint(model, cache_text)
    clean_stale_tmp(root)
    missing = [u for u in urls if not _shard_file(root, u).exists()]
    log.info("feature cache %s: %d/%d shards cached", root, len(urls) - len(missing), len(urls))
    index: dict[str, tuple[Path, int]] | None = None  # read once, on the first shard that could use it
    digests: dict[str, dict[str, str | None]] = {}  # of the shards left to compute: key -> image digest
    reused = 0
    for url in list(missing):  # one shard scanned at a time (its captions are not kept past its turn)
        scan = scan_shard(url)
        if scan["clean"] and index is None:
            index = digest_index(root)
        sh = reuse_shard(scan, index or {}, model, cache_text=cache_text, batch_size=batch_size,
                         device=device, progress=progress)  # fmt: skip
        if sh is not None:
            _save_shard(_shard_file(root, url), sh)
            missing.remove(url)
            reused += 1
        else:
            digests[url] = _digests_by_key(scan)
    if reused:
        log.info("feature cache: %d shard(s) assembled from cached rows of identical images", reused)
    if missing:
        fresh = compute_shards(
            model,
            missing,
            cache_text=cache_text,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
        )
        for url, sh in fresh.items():  # empty shards too: their bad-sample counts persist
            sh["digests"] = [digests[url].get(k) for k in sh["keys"]]
            _save_shard(_shard_file(root, url), sh)
    shards = [_load_shard(_shard_file(root, u)) for u in urls]
    for sh, url in zip(shards, urls):
        sh["shard"] = shard_name(url)
    if report is not None:
        for sh in shards:
            report.merge(sh["bad"])
    shards = [s for s in shards if s["keys"]]
    if not shards:
        raise ValueError(f"no usable samples in {len(urls)} shard(s)")
    return _merge(shards), root


def _digests_by_key(scan: dict[str, Any]) -> dict[str, str | None]:
    """Key -> scanned image digest; None where a key is not unique in its shard (which image a cached
    row holds is then ambiguous, so it is never a reuse source)."""
    seen: dict[str, str | None] = {}
    for k, d in zip(scan["keys"], scan["digests"]):
        seen[k] = None if k in seen else d
    return seen


def _merge(shards: list[dict[str, Any]]) -> CachedData:
    keys = [k for s in shards for k in s["keys"]]
    captions = [c for s in shards for c in s["captions"]]
    image = {k: cat_padded([s["image"][k] for s in shards]) for k in shards[0]["image"]}
    text = offsets = None
    if shards[0]["text"] is not None:
        text = {k: cat_padded([s["text"][k] for s in shards]) for k in shards[0]["text"]}
        offsets = caption_offsets(captions)
    names = [s["shard"] for s in shards for _ in s["keys"]]
    return CachedData(keys, captions, image, text, offsets, shards=names)


def add_side_texts(
    data: CachedData,
    model: ClipModel,
    pools: list[list[str]],
    root: Path,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    progress: bool = True,
) -> int:
    """Text features of the side-table texts of each sample (``pools[i]``), each distinct text encoded once.

    Texts a sample already holds (its shard captions) keep their cached rows; the others are encoded
    once, stored beside the shard files under a hash of the text set (a rerun with the same tables reads
    them) and appended to ``data.text``. No-op when texts are not cached (a trained text tower).
    Returns how many distinct texts were added."""
    if data.text is None:
        return 0
    extra = sorted({t for i, pool in enumerate(pools) for t in pool if t not in data.captions[i]})
    if not extra:
        return 0
    digest = hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:16]
    path = Path(root) / f"texts-{digest}.safetensors"
    feats = None
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("texts", "[]")) == extra:
                feats = {k: f.get_tensor(k) for k in f.keys()}
    if feats is None:
        device = device or torch.device("cpu")
        feats = {k: _store(v) for k, v in _encode_texts(model, extra, batch_size, device, progress).items()}
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in feats.items()}, str(tmp), metadata={"texts": json.dumps(extra)}
            )
    base = next(iter(data.text.values())).shape[0]
    data.text = {k: cat_padded([v, feats[k]]) for k, v in data.text.items()}
    data.extra_rows = {t: base + j for j, t in enumerate(extra)}
    return len(extra)
