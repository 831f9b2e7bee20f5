"""The model-facing half of the server: batchers, label-embedding cache, search, classification.

Everything that touches the model runs on ONE dedicated thread (torch already uses all cores for a
batch; two concurrent model calls would only fight over them). Image decoding runs on a small pool of
its own, and the asyncio loop only shuffles requests, so a slow upload or a big batch never stalls
``/health`` or other requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from clipforge.caption.captioner import Captioner
from clipforge.caption.decoding import DecodeOptions
from clipforge.data.decode import decode_image
from clipforge.data.fetch import FetchError, safe_fetch
from clipforge.export.runtime import model_identity
from clipforge.index.query import check_image_size
from clipforge.index.store import ClipIndex, Hit
from clipforge.models.base import ClipModel
from clipforge.models.encode import (
    embed_pixels,
    embed_texts,
    model_device,
    resolve_precision,
)
from clipforge.serve.batcher import MicroBatcher
from clipforge.serve.captioning import (
    CaptionEngine,
    CaptionJob,
    CaptionResult,
    check_captioner,
    load_captioner,
)
from clipforge.serve.config import ServeConfig
from clipforge.serve.labels import DEFAULT_TEMPLATES, builtin_label_sets, fill_template, read_labels

log = logging.getLogger(__name__)

TEXT_CHUNK = 8  # texts per model call: ~25% less MiniLM work on caption-like queries than one padded batch

__all__ = ["ClipService", "SearchItem", "ServeConfig"]


@dataclass
class SearchItem:
    text: str | None
    vector: np.ndarray | None
    k: int
    filters: dict[str, Any] | None


def index_matches(model: ClipModel, index: ClipIndex) -> bool:
    """Refuse an index of another width; warn (and say so in /health) when the weights differ."""
    if index.embed_dim != model.config.embed_dim:
        raise ValueError(
            f"index {index.dir} holds {index.embed_dim}-d embeddings but the model makes "
            f"{model.config.embed_dim}-d ones: serve it with the model it was built with ({index.model_ref})"
        )
    # an onnx export counts as the torch model it came from (model_identity: same embeddings to 1e-4)
    fp, built_by = model_identity(model), index.manifest.get("model_fingerprint")
    if fp != built_by:
        log.warning(
            "the model's weights differ from those that built the index %s (fingerprint %s vs %s): "
            "search results will be meaningless unless the model is the same; serve a saved model "
            "dir (model.save) rather than a spec with random-init heads",
            index.dir,
            fp,
            built_by,
        )
    return fp == built_by


class ClipService:
    def __init__(
        self,
        model: ClipModel,
        index: ClipIndex | None,
        config: ServeConfig | dict | None = None,
        captioner: Captioner | None = None,
    ) -> None:
        """``captioner``: an in-memory one (tests); else ``config.captioner`` names a dir to load. Either
        is checked against ``model`` (ValueError when it was trained on another model's vectors)."""
        self.model = model.eval()
        self.index = index
        self.cfg = ServeConfig.from_dict(config)
        if captioner is None and self.cfg.captioner:
            captioner = load_captioner(self.cfg.captioner, model)
        elif captioner is not None:
            check_captioner(captioner, model)
        self.captioner = captioner
        self.model_matches_index = index_matches(model, index) if index is not None else None
        self.runtime = "onnx" if getattr(model.config, "backend", None) == "onnx" else "torch"
        # the onnx graphs run in fp32 whatever autocast says: report what actually runs
        self.precision = "fp32" if self.runtime == "onnx" else resolve_precision(model, self.cfg.precision)
        # Text towers (matmuls) gain ~3x from bf16 on AVX512-BF16 CPUs; a CPU convnet image tower gains
        # nothing (efficientnet-lite0, 1 thread: 17.2 ms/img fp32 vs 17.3 bf16), so images stay exact.
        self.device = model_device(model).type
        self.image_precision = self.precision if self.device == "cuda" else "fp32"
        self._start_threads()
        self.label_sets = {k: str(v) for k, v in builtin_label_sets().items()}
        self.label_sets.update(self.cfg.label_sets)
        self._label_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._label_pending: dict[tuple, asyncio.Future] = {}
        self.started = time.time()
        with torch.no_grad():
            self.logit_scale = float(model.logit_scale.exp().clamp(max=100.0))
            self.logit_bias = float(model.logit_bias) if model.logit_bias is not None else None

    def _start_threads(self) -> None:
        """One model thread behind three batchers; decoding and URL fetches on pools of their own (a
        slow sender never delays decoding, and nothing but the model runs on the model thread)."""
        cfg = self.cfg
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="clipforge-model")
        self.decode_pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="clipforge-decode")
        self.fetch_pool = ThreadPoolExecutor(cfg.fetch_threads, thread_name_prefix="clipforge-fetch")
        mb = cfg.max_batch if cfg.batching else 1
        wait = cfg.max_wait_ms if cfg.batching else 0.0
        # Image batches: a CPU convnet gets *slower* per image in a batch (efficientnet-lite0, 1 thread:
        # 12 ms/img alone, 17 at 4, 20 at 16: cache misses), while text and GPU models gain a lot.
        mib = cfg.max_image_batch or (1 if self.device == "cpu" else cfg.max_batch)
        mib = mib if cfg.batching else 1
        self.text_batcher = MicroBatcher(self._embed_texts, self.model_pool, mb, wait, name="text")
        self.image_batcher = MicroBatcher(self._embed_images, self.model_pool, mib, wait, name="image")
        self.search_batcher = MicroBatcher(self._search, self.model_pool, mb, wait, name="search")
        self.caption_engine = None
        self.batchers = [self.text_batcher, self.image_batcher, self.search_batcher]
        if self.captioner is not None:
            self.caption_engine = CaptionEngine(self.captioner, self.model, self.image_precision, mib)
            self.caption_engine.probe()
            self.caption_batcher = MicroBatcher(
                self.caption_engine, self.model_pool, mb, wait, name="caption"
            )
            self.batchers.append(self.caption_batcher)

    # -- model-thread functions (called by the batchers with a list of items) ------------------
    def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        # length-sorted batches of 8: a batch pads only to its own longest text
        return list(embed_texts(self.model, texts, TEXT_CHUNK, self.precision))

    def _embed_images(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        return list(embed_pixels(self.model, torch.stack(pixels), self.image_precision))

    def _search(self, items: list[SearchItem]) -> list[Any]:
        """Encode all text queries in one call, then one faiss call for every unfiltered query."""
        assert self.index is not None
        texts = [it.text for it in items if it.text is not None]
        tvecs = iter(self._embed_texts(texts)) if texts else iter(())
        vecs = [next(tvecs) if it.text is not None else it.vector for it in items]
        out: list[Any] = [None] * len(items)
        plain = [i for i, it in enumerate(items) if not it.filters]
        if plain:
            kmax = max(items[i].k for i in plain)
            hits = self.index.search(np.stack([vecs[i] for i in plain]), kmax)
            for i, h in zip(plain, hits):
                out[i] = h[: items[i].k]
        for i, it in enumerate(items):
            if it.filters:
                try:
                    out[i] = self.index.search(vecs[i][None], it.k, it.filters)[0]
                except Exception as e:  # a bad filter fails only its own request
                    out[i] = e
        return out

    # -- async API used by the HTTP layer --------------------------------------------------------
    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        rows = await asyncio.gather(*(self.text_batcher.submit(t) for t in texts))
        return np.stack(rows)

    async def load_image(self, data: bytes | None = None, url: str | None = None) -> torch.Tensor:
        """Bytes or URL -> preprocessed pixels, decoded off the event loop (SkipSample when bad)."""
        loop = asyncio.get_running_loop()
        if url is not None:
            data = await self._fetch(url)
        assert data is not None
        return await loop.run_in_executor(self.decode_pool, self._decode, data)

    async def _fetch(self, url: str) -> bytes:
        """The URL's bytes via :func:`safe_fetch` (non-public hosts refused unless allowed, every redirect
        checked, a wall-clock deadline); a fetch that cannot start in time is dropped, not queued on."""
        cfg = self.cfg
        kw = {"max_bytes": cfg.max_upload_bytes, "timeout_s": cfg.url_timeout_s}
        call = partial(safe_fetch, url, allow_private=cfg.allow_private_urls, **kw)
        fut = asyncio.get_running_loop().run_in_executor(self.fetch_pool, call)
        try:
            return (await asyncio.wait_for(fut, cfg.url_timeout_s + 1.0)).data
        except asyncio.TimeoutError:
            raise FetchError("timeout", "no fetch thread free before the deadline") from None

    def _decode(self, data: bytes) -> torch.Tensor:
        check_image_size(data, self.cfg.max_image_pixels)
        return self.model.preprocess(decode_image(data))

    async def embed_image(self, pixels: torch.Tensor) -> np.ndarray:
        return await self.image_batcher.submit(pixels)

    async def search(
        self,
        text: str | None = None,
        vector: np.ndarray | None = None,
        k: int = 10,
        filters: dict | None = None,
    ) -> list[Hit]:
        return await self.search_batcher.submit(SearchItem(text, vector, k, filters or None))

    async def caption(self, pixels: torch.Tensor, opts: DecodeOptions, num: int = 1) -> CaptionResult:
        """Captions of one image (``num`` > 1: sampled); batched with concurrent /caption requests."""
        if self.captioner is None:
            raise RuntimeError("this service has no captioner")
        return await self.caption_batcher.submit(CaptionJob(pixels, opts, num))

    def label_set(self, name: str) -> list[str]:
        if name not in self.label_sets:
            raise KeyError(name)
        return read_labels(self.label_sets[name])

    async def label_embeddings(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        """[L, D] unit rows: each label's prompts encoded and averaged (cached; concurrent misses share)."""
        key = (labels, templates)
        if key in self._label_cache:
            self._label_cache.move_to_end(key)
            return self._label_cache[key]
        if key in self._label_pending:
            return await asyncio.shield(self._label_pending[key])
        fut = asyncio.get_running_loop().create_future()
        self._label_pending[key] = fut
        try:
            emb = await self._compute_labels(labels, templates)
            fut.set_result(emb)
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters re-raise it
            raise
        finally:
            self._label_pending.pop(key, None)
        self._label_cache[key] = emb
        while len(self._label_cache) > 64:
            self._label_cache.popitem(last=False)
        return emb

    async def _compute_labels(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        prompts = [fill_template(t, lab) for lab in labels for t in templates]
        parts = []
        for i in range(0, len(prompts), 256):  # chunks: other requests interleave on the model thread
            parts.append(
                np.stack(await loop.run_in_executor(self.model_pool, self._embed_texts, prompts[i : i + 256]))
            )
        emb = np.concatenate(parts).reshape(len(labels), len(templates), -1).mean(1)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    async def classify(
        self,
        pixels: torch.Tensor,
        labels: list[str],
        templates: tuple[str, ...] = DEFAULT_TEMPLATES,
        top_k: int = 10,
    ) -> list[dict[str, Any]]:
        img, lab = await asyncio.gather(
            self.embed_image(pixels), self.label_embeddings(tuple(labels), tuple(templates))
        )
        logits = self.logit_scale * (lab @ img)
        if self.logit_bias is not None:  # SigLIP: independent sigmoid per label
            probs = 1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))
        else:
            z = np.exp(logits - logits.max())
            probs = z / z.sum()
        order = np.argsort(-probs)[:top_k]
        return [{"label": labels[i], "prob": float(probs[i]), "score": float(lab[i] @ img)} for i in order]

    def results(self, hits: list[Hit], base: str = "") -> list[dict[str, Any]]:
        assert self.index is not None
        out = self.index.results(hits)
        for r in out:
            r.pop("source", None)  # server-side paths stay private
            r["image_url"] = f"{base}/images/{r['uid']}"
        return out

    def stats(self) -> dict[str, Any]:
        return {b.name: b.stats.to_dict() for b in self.batchers}

    async def close(self) -> None:
        for b in self.batchers:
            await b.close()
        self.model_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
