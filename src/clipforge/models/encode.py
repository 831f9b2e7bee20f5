"""The one model-side encode layer: every command that turns images or texts into embeddings uses it.

Evaluation, index build, the train feature cache, curation's clip-score and the server differ only in
what they *store*; the work is the same and lives here: no grad, eval mode, optional bf16 autocast,
texts batched in length order (a batch pads only to its own longest text) with rows put back in input
order, and one loop over shards (clip-retrieval's ``clip_inference`` shape: one mapper feeding every
writer) where DataLoader workers decode + preprocess and the main process runs the image tower.

``fingerprint(model)`` is the one answer to "is this the same model?" for every cache (class
embeddings, index parts, train feature cache): config + the bytes of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.data.dataset import ShardDataset, collate
from clipforge.data.decode import DecodeConfig, SkipSample
from clipforge.data.report import BadSampleReport
from clipforge.data.transforms import ImageTransform
from clipforge.runtime import worker_start_method

FINGERPRINT_VERSION = 1
Device = str | torch.device | nn.Module


# -- device / precision ---------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (cpu for a parameterless model)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _device(d: Device) -> torch.device:
    return model_device(d) if isinstance(d, nn.Module) else torch.device(d)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is ~3x faster
    than fp32 for a MiniLM text tower; elsewhere it is emulated and slower, so ``auto`` stays fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _auto_precision(dev: torch.device) -> str:
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_native_bf16() else "fp32"


def resolve_precision(model: nn.Module | Device, precision: str) -> str:
    """``fp32`` | ``bf16`` | ``auto`` -> the precision to run at (``auto``: bf16 where it is native)."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    return _auto_precision(_device(model)) if precision == "auto" else precision


def autocast(precision: str, device_or_model: Device = "cpu") -> contextlib.AbstractContextManager:
    """The one autocast: ``fp32`` is a no-op, ``bf16`` autocasts matmuls (weights stay fp32; CPU and
    CUDA), ``auto`` is bf16 where native. Autocast state is thread-local: enter it on the model's thread."""
    dev = _device(device_or_model)
    if precision == "auto":
        precision = _auto_precision(dev)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}: fp32 | bf16 | auto")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, the model's train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- rows -----------------------------------------------------------------------------------------
def to_numpy32(t: torch.Tensor) -> np.ndarray:
    """float32 numpy view of a tensor: no copy when it already is float32 on the CPU."""
    return t.detach().to("cpu", torch.float32).numpy()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows in float32 (a zero row stays zero instead of becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class RowBuffer:
    """Rows appended batch by batch into one array that doubles when full (no per-batch concatenation)."""

    def __init__(self, dtype: Any = np.float32, capacity: int = 0) -> None:
        self.dtype, self.capacity, self.n = dtype, capacity, 0
        self.data: np.ndarray | None = None

    def append(self, rows: np.ndarray) -> None:
        b = rows.shape[0]
        if self.data is None:
            self.data = np.empty((max(self.capacity, b, 1), *rows.shape[1:]), dtype=self.dtype)
        elif self.n + b > self.data.shape[0]:
            grown = np.empty((max(2 * self.data.shape[0], self.n + b), *self.data.shape[1:]), self.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : self.n + b] = rows
        self.n += b

    def array(self, dim: int = 0) -> np.ndarray:
        """The rows so far (a view, no copy); ``(0, dim)`` when none were appended."""
        return self.data[: self.n] if self.data is not None else np.zeros((0, dim), dtype=self.dtype)


# -- texts ----------------------------------------------------------------------------------------
def length_sorted(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` by (length, index): batches of neighbours pad to similar lengths."""
    return sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))


def _tokens(model: Any, texts: list[str], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) for k, v in model.tokenize(texts).items()}


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@torch.inference_mode()
def embed_texts(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    precision: str = "fp32",
    *,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Texts -> [N, D] float32 unit rows, row i for ``texts[i]``.

    Texts are sorted by length and cut into batches of ``batch_size`` (each padded only to its own
    longest text: ~25% less MiniLM work on captions). With ``world > 1`` this rank embeds every
    ``world``-th text of that order and ``gather`` (default ``torch.distributed.all_gather_object``)
    brings the pieces together; every rank returns all rows.
    """
    texts = list(texts)
    n = len(texts)
    dim = int(getattr(getattr(model, "config", None), "embed_dim", 0) or 0)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    order = length_sorted(texts)
    mine = order[rank::world]
    dev = model_device(model)
    out: np.ndarray | None = None
    with eval_mode(model):
        for i in range(0, len(mine), batch_size):
            idx = mine[i : i + batch_size]
            with autocast(precision, dev):
                emb = to_numpy32(model.encode_text(_tokens(model, [texts[j] for j in idx], dev)))
            if out is None:  # sized once: every row of the result (or of this rank's share)
                out = np.empty((n if world == 1 else len(mine), emb.shape[1]), dtype=np.float32)
            if world == 1:
                out[idx] = emb
            else:
                out[i : i + len(idx)] = emb
            if progress is not None:
                progress(len(idx) * world)
    if world == 1:
        assert out is not None
        return out
    parts = (gather or _all_gather)((mine, out))
    dim = max(p[1].shape[1] for p in parts if p[1] is not None and len(p[0]))
    full = np.empty((n, dim), dtype=np.float32)
    for idx, e in parts:
        if len(idx):
            full[idx] = e
    return full


# -- images ---------------------------------------------------------------------------------------
@torch.inference_mode()
def embed_pixels(
    model: Any, pixels: torch.Tensor, precision: str = "fp32", channels_last: bool = False
) -> np.ndarray:
    """Preprocessed pixels [B, 3, S, S] -> [B, D] float32 unit rows."""
    if pixels.shape[0] == 0:
        return np.zeros((0, int(model.config.embed_dim)), dtype=np.float32)
    dev = model_device(model)
    px = pixels.to(dev)
    if channels_last:
        px = px.contiguous(memory_format=torch.channels_last)
    with autocast(precision, dev):
        return to_numpy32(model.encode_image(px))


def embed_pil_images(
    model: Any, images: Sequence[Any], precision: str = "fp32", transform: Callable | None = None
) -> np.ndarray:
    """PIL images -> [B, D] float32 unit rows (the model's eval preprocessing unless ``transform``)."""
    if not images:
        return np.zeros((0, int(model.config.embed_dim)), dtype=np.float32)
    tf = transform or model.preprocess
    return embed_pixels(model, torch.stack([tf(im) for im in images]), precision)


# -- fingerprint ----------------------------------------------------------------------------------
def _config_dict(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return asdict(cfg) if is_dataclass(cfg) else repr(cfg)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def fingerprint(model: nn.Module, frozen_only: bool = False) -> str:
    """The one model identity for every cache: class + config + the bytes of the weights (16 hex).

    ``frozen_only``: only parameters with ``requires_grad=False`` (+ all buffers) - what a cache of
    frozen-prefix features depends on, so training the heads keeps the same fingerprint. Hashing the
    full bytes (not a slice, not a float cast) means any changed weight gives a new identity.
    """
    h = hashlib.sha256()
    meta = {"v": FINGERPRINT_VERSION, "class": type(model).__qualname__, "config": _config_dict(model)}
    meta["frozen_only"] = frozen_only
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())  # tuple == list
    tensors = [(n, p) for n, p in model.named_parameters() if not (frozen_only and p.requires_grad)]
    tensors += list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda x: x[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


# -- the one loop over shards ---------------------------------------------------------------------
class Prepare:
    """DataLoader-side map (picklable): decoded sample -> pixels + key + shard + the requested fields.

    A preprocessing failure is a counted skip (``preprocess_error``), never a crash mid-run.
    """

    raw = False  # True: called on the raw tar sample (a subclass that decodes itself)

    def __init__(self, transform: Callable, fields: Iterable[str] = ()) -> None:
        self.transform = transform
        self.fields = tuple(fields)
        # clipforge's own transform: the worker sends uint8 pixels and the consumer normalizes the batch
        # (:meth:`finish`, bitwise the same floats): 1/4 of the shared memory a batch costs both processes
        self.uint8 = type(transform) is ImageTransform

    def pixels(self, image: Any) -> torch.Tensor:
        try:
            return self.transform.uint8(image) if self.uint8 else self.transform(image)
        except Exception as e:
            raise SkipSample("preprocess_error", f"{type(e).__name__}: {str(e)[:200]}") from None

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """Consumer side: a collated batch of :meth:`pixels` -> the float32 ``[B, 3, S, S]`` model input."""
        if self.uint8 and pixels.dtype == torch.uint8:
            return self.transform.normalize(pixels)
        return pixels

    def __call__(self, s: dict[str, Any]) -> dict[str, Any]:
        out = {"pixels": self.pixels(s["image"]), "key": s["key"], "shard": s["shard"]}
        for f in self.fields:
            out[f] = s[f]
        return out


class EncodeDataset(ShardDataset):
    """ShardDataset whose map may work on the raw sample (``prepare.raw``), for stores that decode
    optional fields themselves. Its workers die with their parent (ShardDataset calls
    ``runtime.die_with_parent`` in every DataLoader worker)."""

    def _map(self, raw: dict[str, Any]) -> dict[str, Any]:
        if getattr(self.map_fn, "raw", False):
            return self.map_fn(raw)  # type: ignore[misc]
        return super()._map(raw)


@dataclass
class EncodedBatch:
    """One batch out of :func:`encode_shards`: row i of ``emb`` (or of each ``features`` tensor) is
    ``keys[i]``.

    ``emb`` is None for a batch that carries only bad-sample records (``bad``: (key, reason, detail)).
    """

    keys: list[str]
    emb: np.ndarray | None
    fields: dict[str, Any] = field(default_factory=dict)
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    features: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys)


def encode_shards(
    model: Any,
    shards: str | list[str],
    *,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    fields: Iterable[str] = (),
    decode: DecodeConfig | None = None,
    batch_size: int = 64,
    workers: int = 1,
    precision: str = "fp32",
    channels_last: bool = False,
    features: bool = False,
    rank: int = 0,
    world: int = 1,
    split: str = "auto",
    report: BadSampleReport | None = None,
    prefetch: int = 4,
    limit: int | None = None,
) -> Iterator[EncodedBatch]:
    """The one loop over shards: workers decode + preprocess, the main process embeds; yields batches.

    ``prepare`` (default :class:`Prepare` with the model's eval transform and ``fields``) turns a
    decoded sample into ``{"pixels", "key", ...}``; every other key it returns comes back in
    ``EncodedBatch.fields``. A ``prepare.finish(pixels)`` method, when present, turns the collated
    pixels into the model input in this process (:class:`Prepare`: uint8 from the workers -> float). ``features``: run the frozen image prefix (``image_features``) instead of
    the full embedding (what the train feature cache stores). ``rank``/``world`` split samples across
    processes. Bad samples are reported by key in each batch's ``bad`` (and added to ``report``).
    ``limit``: stop after that many good samples (the last batch is cut *before* the forward pass).
    """
    fields = tuple(fields)
    prep = prepare or Prepare(model.preprocess, fields)
    if decode is None:
        decode = DecodeConfig(image=True, caption="caption" in fields or "captions" in fields,
                              label="label" in fields)  # fmt: skip
    autocast(precision)  # validate before any work
    ds = EncodeDataset(
        shards, prep, decode=decode, epochs=1, rank=rank, world_size=world, split=split,
        report=BadSampleReport(),  # per-worker copy; the consumer-side report is ``report``
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=prefetch if workers > 0 else None,
        multiprocessing_context=worker_start_method() if workers else None,
    )
    dev = model_device(model)
    left = limit
    finish = getattr(prep, "finish", None)  # uint8 batches from the workers -> float model input
    with eval_mode(model):
        if channels_last and not features:
            model.to(memory_format=torch.channels_last)
        for batch in loader:
            bad = list(batch.get("__bad__", []))
            if report is not None:
                for k, r, d in bad:
                    report.add(k, r, d)
            if batch["size"] == 0:
                yield EncodedBatch([], None, bad=bad)
                continue
            if left is not None:
                batch = _head(batch, left)
                left -= batch["size"]
            extra = {
                k: v
                for k, v in batch.items()
                if k not in ("pixels", "key", "size") and not k.startswith("__")
            }
            pixels = finish(batch["pixels"]) if finish is not None else batch["pixels"]
            if features:
                with torch.inference_mode():
                    feats = model.image_features(pixels.to(dev))
                feats = {k: v.cpu() for k, v in feats.items()}
                yield EncodedBatch(list(batch["key"]), None, extra, bad, feats)
            else:
                emb = embed_pixels(model, pixels, precision, channels_last)
                yield EncodedBatch(list(batch["key"]), emb, extra, bad)
            if left is not None and left <= 0:
                break  # no further batch is read: nothing past the limit is decoded or reported


def _head(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch (tensors and lists alike)."""
    if batch["size"] <= n:
        return batch
    out = {
        k: (v[:n] if isinstance(v, (list, torch.Tensor)) and not k.startswith("__") else v)
        for k, v in batch.items()
    }
    out["size"] = n
    return out


__all__ = [
    "EncodeDataset",
    "EncodedBatch",
    "Prepare",
    "RowBuffer",
    "autocast",
    "cpu_has_native_bf16",
    "embed_pil_images",
    "embed_pixels",
    "embed_texts",
    "encode_shards",
    "eval_mode",
    "fingerprint",
    "length_sorted",
    "model_device",
    "normalize_rows",
    "resolve_precision",
    "to_numpy32",
]
