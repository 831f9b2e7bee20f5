"""The training loop: a :class:`Trainer` whose methods are its plain parts (torchtitan style).

    setup (dirs, config check, seeds, model on device / FSDP2) -> data source (feature cache or
    streaming batches) -> resume (checkpoint: weights, optimizer, RNG, data position)
    -> step (forward_backward, GradCache when accum > 1; average grads; clip; AdamW) -> log
    -> save (checkpoint every N steps) -> finish (final model, result.json)

``loss: coca`` adds a captioning decoder trained on the same batches (train/coca.py): the run's model dir
then also holds ``captioner/`` and the model captions (``model.caption(images)``).

``train(config)`` builds the model from ``config.model``; ``fit(model, shards, config)`` trains a model
you already hold and returns it (the Python API the quickstart uses). ``hooks`` (:class:`TrainHooks`)
are called at fixed points (tests record keys and kill runs through them).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.models import load_model
from clipforge.models.base import ClipModel
from clipforge.train import checkpoint as ckpt
from clipforge.train import coca as coca_mod
from clipforge.train.cache import add_side_texts, load_or_build_cache
from clipforge.train.config import TrainConfig, check_resume_config
from clipforge.train.data import CachedBatches, StreamingBatches, TrainSampleMap, count_samples, shard_keys
from clipforge.train.dist import (
    all_reduce_grads,
    barrier,
    broadcast_object,
    cleanup,
    gather_objects,
    init_distributed,
    mean_across,
    shard_model,
)
from clipforge.train.hooks import TrainHooks
from clipforge.train.logger import MetricsLogger, plot_curves
from clipforge.train.loss import build_loss
from clipforge.train.optim import build_optimizer, clip_grad, lr_at, set_lr
from clipforge.train.step import forward_backward, forward_image, forward_text
from clipforge.train.textsource import build_chooser
from clipforge.utils import clean_stale_tmp, format_table, setup_torch_threads, write_json

log = logging.getLogger(__name__)

SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def prepare_for_loss(model: ClipModel, loss: str) -> None:
    """SigLIP needs a learnable bias (init -10) and temperature init log(10): add them if missing."""
    if loss == "siglip" and model.logit_bias is None:
        model.logit_bias = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS))
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_SCALE)
        model.config.init_logit_bias = SIGLIP_INIT_BIAS
        model.config.init_logit_scale = SIGLIP_INIT_SCALE


def set_train_mode(model: torch.nn.Module) -> None:
    """train() for what trains; eval() for fully frozen submodules (no BN stat drift, no dropout)."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for k in ("image", "text"):
        out[k] = {n: v.to(device, non_blocking=True) for n, v in batch[k].items()}
    for k in ("img_ids", "txt_ids", "weights"):
        if out.get(k) is not None:
            out[k] = out[k].to(device)
    return out


def train(config: TrainConfig | dict | str | Path, hooks: TrainHooks | None = None) -> dict[str, Any]:
    """Build ``config.model`` and train it; returns the result dict (also saved as OUTPUT/result.json)."""
    cfg = TrainConfig.from_any(config)
    model = load_model(cfg.model, allow_code=True, **cfg.model_opts)  # the user's own spec (see cli)
    return run(model, cfg, hooks)


def fit(
    model: ClipModel,
    shards: str | list[str],
    config: TrainConfig | dict | str | Path | None = None,
    hooks: TrainHooks | None = None,
) -> ClipModel:
    """Train ``model`` on ``shards`` in place and return it (result dict at ``model.train_result``)."""
    cfg = TrainConfig.from_any(
        {
            **(config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})),
            "data": [shards] if isinstance(shards, str) else list(shards),
        }
    )
    model.train_result = run(model, cfg, hooks)
    return model


def run(model: ClipModel, cfg: TrainConfig, hooks: TrainHooks | None = None) -> dict[str, Any]:
    cfg.validate()
    setup_torch_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    try:
        return Trainer(model, cfg, dist, hooks).train()
    finally:
        cleanup()


def clean_run_dir(out: Path) -> int:
    """Remove what a killed run left half-written: temp checkpoint dirs, a model or JSON being saved.

    Everything under ``checkpoints/`` is ours; at OUTPUT's top level only our own hidden ``.*.tmp``
    names (OUTPUT may be a folder that holds other things). Returns how many were removed.
    """
    n = clean_stale_tmp(out / "checkpoints") if (out / "checkpoints").is_dir() else 0
    for p in out.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    if n:
        log.info("removed %d temp files/dirs left in %s by a killed run", n, out)
    return n


class Trainer:
    """One run. ``__init__`` is the setup; :meth:`train` runs the loop over :meth:`step` / :meth:`save`."""

    def __init__(self, model: ClipModel, cfg: TrainConfig, dist: Any, hooks: TrainHooks | None = None):
        self.cfg, self.dist, self.hooks = cfg, dist, hooks or TrainHooks()
        self.rank, self.world, self.device = dist.rank, dist.world, dist.device
        self.out = Path(cfg.output)
        self.ckpt_root = self.out / "checkpoints"
        self._prepare_dir()
        seed_everything(cfg.seed + self.rank)
        if cfg.batch_size % (self.world * cfg.accum):
            raise ValueError(
                f"batch size {cfg.batch_size} must divide by world size x accum = {self.world * cfg.accum}"
            )
        self.user_model = model
        self.model = self._prepare_model(model)
        self.embed = (forward_image, forward_text)
        if cfg.compile:
            self.embed = (torch.compile(forward_image), torch.compile(forward_text))
        self.loss_fn = build_loss("clip" if cfg.loss == "coca" else cfg.loss, cfg.local_loss)
        self.report = BadSampleReport()
        self.urls = expand_shards(cfg.data)
        if not self.urls:
            raise ValueError(f"no shards match {cfg.data}")
        self.cached = cfg.cache == "auto" and self.model.image_locked
        self.show = cfg.progress and dist.main
        self.cache_dir: Path | None = None
        self.chooser, self.side = build_chooser(cfg, self._n_captions)
        self.source: Any = self._cached_source() if self.cached else None
        self.text_report = self._text_report()
        if not self.cached:
            self.n_samples = broadcast_object(
                count_samples(self.urls) if (dist.main and cfg.epochs) else 0, self.world
            )
            self.steps_per_epoch = max(self.n_samples // cfg.batch_size, 1)
        self.total = (
            int(cfg.steps) if cfg.steps else max(int(cfg.epochs * self.n_samples) // cfg.batch_size, 1)
        )
        self.coca = self._setup_coca() if cfg.loss == "coca" else None
        self.optimizer = build_optimizer(
            self.model, cfg.lr, cfg.wd, tuple(cfg.betas), cfg.eps,
            lr_scales={coca_mod.ATTR: cfg.caption.lr_scale} if self.coca else None,
        )  # fmt: skip
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        dec = coca_mod.decoder_of(self.model)
        dec_ids = {id(p) for p in dec.parameters()} if dec is not None else set()
        self.dec_params = [p for p in self.trainable if id(p) in dec_ids]  # clipped apart from the rest
        self.clip_params = [p for p in self.trainable if id(p) not in dec_ids]
        self.step_no, state = self._resume()
        if not self.cached:  # after the RNG restore: the DataLoader draws its seed from it
            self.source = self._streaming_source(state.get("data", {}))
        self.metrics = MetricsLogger(
            self.out, dist.main, cfg.tensorboard, resume_step=self.step_no if state else None
        )
        self.seen, self.loss_v, self.last_ckpt = 0, float("nan"), None

    # -- setup ----------------------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        """Clean what a killed run left, check a resumed run continues the same config, write it."""
        latest = ckpt.latest_checkpoint(self.ckpt_root) if self.cfg.resume else None
        if latest is not None:
            check_resume_config(self.out / "config.yaml", self.cfg)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_run_dir(self.out)
            self.cfg.save(self.out / "config.yaml")

    def _prepare_model(self, model: ClipModel) -> ClipModel:
        """Loss-specific parameters, device, gradient checkpointing, FSDP2 sharding (of a copy)."""
        cfg = self.cfg
        prepare_for_loss(model, cfg.loss)
        self.fsdp = cfg.fsdp and self.world > 1
        if cfg.fsdp and not self.fsdp:
            log.warning("fsdp=True with one process: nothing to shard, training unsharded")
        if (
            self.fsdp
        ):  # fully_shard rewrites modules in place, for good: train a copy, hand back a plain model
            tok = getattr(model, "tokenizer", None)
            model = copy.deepcopy(model, memo={id(tok): tok})  # (the tokenizer is shared, not copied)
        model.to(self.device)
        if cfg.grad_checkpointing:
            fn = getattr(model, "set_grad_checkpointing", None)
            if fn is None:
                log.warning("model %s has no set_grad_checkpointing(); flag ignored", type(model).__name__)
            else:
                fn(True)
        if self.fsdp:
            sharded = shard_model(model, self.device)
            if not sharded:
                log.warning("fsdp: %s has no trainable tower to shard", type(model).__name__)
            else:
                log.info(
                    "fsdp: sharded %d modules over %d ranks: %s", len(sharded), self.world, ", ".join(sharded)
                )
        return model

    # -- data source ----------------------------------------------------------------------------
    @property
    def _n_captions(self) -> int:
        if self.cfg.text_source == "multi" and self.cfg.multi_positive <= 1:
            return 2  # multi: raw + synthetic at least
        return max(self.cfg.multi_positive, 1)

    def _text_report(self) -> dict[str, Any] | None:
        """What the side tables give this run's samples (counted once per key, not per view); rank 0."""
        if self.side is None or not self.dist.main:
            return None
        if self.cached:
            d = self.source.data
            samples = list(zip(d.shards or [""] * len(d), d.keys))
        else:
            samples = shard_keys(self.urls)
        rep = self.side.coverage(samples, self.chooser.source)
        for role, n in rep["missing"].items():
            if n:
                log.warning(
                    "text source: %d of %d samples have no %s (%s), e.g. %s%s", n, rep["samples"], role,
                    rep["columns"][role], ", ".join(rep["missing_keys"][role][:3]),
                    "; they keep their raw caption" if role == "synthetic" else "",
                )  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "text_source.json", rep)
        return rep

    def _cached_source(self) -> CachedBatches:
        """Locked image tower: features computed once (rank 0; the others read its files)."""
        cfg, main = self.cfg, self.dist.main
        root = Path(cfg.cache_dir) if cfg.cache_dir else self.out.parent / ".feature_cache"
        kw = dict(
            batch_size=cfg.cache_batch_size, workers=cfg.workers, device=self.device, progress=self.show
        )
        if main:
            data, self.cache_dir = load_or_build_cache(self.model, self.urls, root, report=self.report, **kw)
        barrier(self.world)
        if not main:
            data, self.cache_dir = load_or_build_cache(self.model, self.urls, root, report=None, **kw)
        if self.chooser.source.mode != "raw" and data.text_cached:  # side-table texts: encoded once
            all_caps = cfg.caption_field == "captions"
            pools = [
                self.chooser.pool(caps if all_caps else caps[:1], key, shard)
                for caps, key, shard in zip(data.captions, data.keys, data.shards)
            ]
            tkw = dict(batch_size=cfg.cache_batch_size, device=self.device, progress=self.show)
            if main:
                n = add_side_texts(data, self.model, pools, self.cache_dir, **tkw)
                log.info("feature cache: %d distinct side-table texts", n)
            barrier(self.world)
            if not main:
                add_side_texts(data, self.model, pools, self.cache_dir, **tkw)
        source = CachedBatches(
            data,
            cfg.batch_size,
            self.model.tokenize,
            rank=self.rank,
            world=self.world,
            seed=cfg.seed,
            n_captions=self._n_captions,
            all_captions=cfg.caption_field == "captions",
            chooser=self.chooser,
        )
        self.steps_per_epoch, self.n_samples = source.steps_per_epoch, len(data)
        return source

    def _streaming_source(self, data_state: dict[str, Any]) -> StreamingBatches:
        """Trained image tower: batches decoded from shards, continuing at a checkpoint's position."""
        cfg, model = self.cfg, self.model
        per_rank = data_state.get("loader_batches", [])
        sample_map = TrainSampleMap(
            model.config.preprocess,
            cfg.augment and not model.image_locked,
            self._n_captions,
            cfg.seed,
            cfg.caption_field == "captions",
            chooser=self.chooser if self.side is not None else None,
        )
        return StreamingBatches(
            self.urls,
            cfg.batch_size // self.world,
            sample_map,
            model.tokenize,
            rank=self.rank,
            world=self.world,
            workers=cfg.workers,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            report=self.report,
            position=data_state.get("position"),
            loader_batches=per_rank[self.rank] if self.rank < len(per_rank) else 0,
        )

    def _setup_coca(self) -> coca_mod.CocaHead:
        """The caption vocabulary (from the training captions) and the decoder, attached to the model."""
        cfg, model = self.cfg, self.model
        all_caps = cfg.caption_field == "captions"
        cached_data = self.source.data if self.cached else None
        condition = coca_mod.resolve_condition(cfg.caption.condition, model)

        def captions() -> list[str]:
            if cached_data is not None:
                return [c for caps in cached_data.captions for c in (caps if all_caps else caps[:1])]
            return coca_mod.shard_captions(self.urls, all_caps)

        vocab = coca_mod.load_or_build_vocab(self.out, captions, cfg.caption, cfg.resume, self.dist.main)
        decoder = coca_mod.decoder_for(self, condition, len(vocab))  # spatial: cross-attention + token cache
        model.add_module(coca_mod.ATTR, decoder.to(self.device))
        log.info(
            "coca: %s-conditioned decoder, %.2fM parameters, vocabulary %d, caption_weight %g",
            condition, decoder.num_params() / 1e6, len(vocab), cfg.caption_weight,
        )  # fmt: skip
        return coca_mod.CocaHead(vocab, condition, cfg.caption, cfg.caption_weight)

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> tuple[int, dict[str, Any]]:
        """(step, checkpoint state) of the latest checkpoint when resuming, else (0, {})."""
        if not self.cfg.resume:
            return 0, {}
        last = ckpt.latest_checkpoint(self.ckpt_root)
        if last is None:
            log.info("--resume: no checkpoint in %s, starting fresh", self.ckpt_root)
            return 0, {}
        state = ckpt.load_checkpoint(last, self.model, self.optimizer, self.rank)
        self.report.counts.clear()  # the checkpoint's report already holds everything counted so far
        self.report.keys.clear()
        self.report.merge(state.get("bad", {}))
        log.info("resumed from %s at step %d", last, int(state["step"]))
        return int(state["step"]), state

    # -- step -----------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, Any]:
        return self.source.batch(self.step_no) if self.cached else self.source.next()

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step on ``batch``; returns its metrics row."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step_no, cfg.lr, cfg.warmup, self.total, cfg.min_lr_ratio)
        set_lr(self.optimizer, lr)
        if self.coca is not None:
            batch["caption_tokens"] = self.coca.tokens(batch["captions"])
        batch = _to(batch, self.device)
        set_train_mode(model)
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        loss = forward_backward(
            model, self.loss_fn, batch, cfg.accum, self.device, cfg.precision, embed=self.embed,
            coca=self.coca, stats=stats,
        )  # fmt: skip
        all_reduce_grads(self.trainable, self.world)
        gnorm = clip_grad(self.clip_params, cfg.grad_clip)
        dec_gnorm = clip_grad(self.dec_params, cfg.grad_clip) if self.coca is not None else None
        self.optimizer.step()
        self.step_no += 1
        self.seen += cfg.batch_size
        self.loss_v = mean_across(float(loss), self.world, self.device)
        extra: dict[str, float] = {}
        if self.coca is not None:
            cap = mean_across(stats["caption_loss"], self.world, self.device)
            extra = {"contrastive_loss": self.loss_v, "caption_loss": cap, "caption_grad_norm": dec_gnorm}
            self.loss_v = self.loss_v + self.coca.weight * cap
            self.cap_v = cap
        if self.cached:
            epoch = batch.get("epoch", self.step_no // max(self.steps_per_epoch, 1))
        else:
            epoch = self.source.epoch
        return {
            "step": self.step_no,
            "epoch": int(epoch),
            "loss": self.loss_v,
            "lr": lr,
            "grad_norm": gnorm,
            "scale": float(model.logit_scale.detach().exp()),
            "samples_per_s": self.seen / max(time.perf_counter() - self.t0, 1e-9),
            **extra,
        }

    # -- save -----------------------------------------------------------------------------------
    def _data_state(self) -> dict[str, Any]:
        """Every rank's data position (a collective when streaming)."""
        data_part: dict[str, Any] = {"mode": "cached" if self.cached else "streaming"}
        if not self.cached:
            states = gather_objects(self.source.state(), self.world)
            slots: dict[str, Any] = {}
            for s in states:
                slots.update(s["position"]["slots"])
            data_part["position"] = {"nslots": states[0]["position"]["nslots"], "slots": slots}
            data_part["loader_batches"] = [s["loader_batches"] for s in states]
        return data_part

    def save(self) -> Path | None:
        """A checkpoint at the current step (every rank calls it; rank 0 writes); returns its path."""
        data_part = self._data_state()
        rngs = gather_objects(ckpt.rng_state(), self.world)
        full = ckpt.gather_full_state(self.model, self.optimizer) if self.fsdp else None  # a collective
        path = None
        if self.dist.main:
            meta = {
                "data": data_part,
                "bad": self.report.to_dict(),
                "config": self.cfg.to_dict(),
                "world": self.world,
            }
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                self.step_no,
                self.model,
                self.optimizer,
                meta,
                rngs,
                keep=self.cfg.keep_checkpoints,
                full=full,
            )
        barrier(self.world)
        return path

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, hooks = self.cfg, self.hooks
        bar = tqdm(
            total=self.total,
            initial=self.step_no,
            desc="train",
            unit="step",
            disable=not self.show,
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        while self.step_no < self.total:
            batch = self.next_batch()
            if hooks.on_batch:
                hooks.on_batch(self.step_no + 1, batch, self.rank)
            row = self.step(batch)
            if self.step_no % cfg.log_every == 0 or self.step_no == self.total:
                self.metrics.log(row)
            bar.set_postfix(
                loss=f"{self.loss_v:.4f}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.0f}"
            )
            bar.update(1)
            if cfg.save_every and self.step_no % cfg.save_every == 0 and self.step_no < self.total:
                self.last_ckpt = self.save()
            if hooks.on_step_end:
                hooks.on_step_end(self.step_no)
        bar.close()
        return self.finish(time.perf_counter() - self.t0)

    # -- finish ---------------------------------------------------------------------------------
    def finish(self, elapsed: float) -> dict[str, Any]:
        """Last checkpoint, the trained weights back in the caller's model, model dir + result.json."""
        if self.total > 0:
            self.last_ckpt = self.save()
        self.metrics.close()
        decoder = coca_mod.detach_decoder(self.model)  # the model dir holds a plain CLIP model ...
        model = self.model
        if self.fsdp:  # every rank's caller gets the trained weights, unsharded, on the model's own device
            self.user_model.load_state_dict(
                get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            )
            model = self.user_model
        out = self.out
        result: dict[str, Any] = {
            "steps": self.step_no,
            "final_loss": self.loss_v,
            "samples_per_s": self.seen / max(elapsed, 1e-9) if self.seen else 0.0,
            "train_seconds": elapsed,
            "world_size": self.world,
            "mode": "cached" if self.cached else "streaming",
            "samples": self.n_samples,
            "steps_per_epoch": self.steps_per_epoch,
            "output": str(out),
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "bad_samples": self.report.to_dict()["counts"],
        }
        if self.text_report is not None:
            result["text_source"] = self.text_report
        if self.coca is not None and decoder is not None:  # ... and the decoder beside it
            result["caption_loss"] = getattr(self, "cap_v", float("nan"))
            result["caption_vocab"] = len(self.coca.vocab)
            run = {"data": self.cfg.data, "steps": self.step_no, "caption_weight": self.cfg.caption_weight}
            self.user_model.captioner = self.coca.captioner(model, decoder.cpu(), run, out / "model")
            if model is not self.user_model:
                model.captioner = self.user_model.captioner
        if self.dist.main:
            result["model_dir"] = str(model.save(out / "model"))
            if self.coca is not None:  # (again: a model's own save() may not write it, or leave an old one)
                coca_mod.save_captioner(model.captioner, out / "model")
            self.report.save(out / "bad_samples.json")
            png = plot_curves(out / "metrics.jsonl", out / "curves.png")
            result["metrics"] = str(out / "metrics.jsonl")
            result["curve"] = str(png) if png else None
            write_json(out / "result.json", result)
            log.info(
                "\n%s",
                format_table(
                    [[k, v] for k, v in result.items() if not isinstance(v, dict)], ["key", "value"]
                ),
            )
        return result
