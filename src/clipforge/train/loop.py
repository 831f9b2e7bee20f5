"""The training loop, composed of the plain parts beside it (torchtitan style).

    load_model -> [FSDP2: shard the trainable towers] -> feature cache or streaming batches
    -> forward_backward (GradCache when accum > 1) -> average grads over ranks -> clip -> AdamW step
    -> log -> checkpoint every N steps -> save model

``train(config)`` builds the model from ``config.model``; ``fit(model, shards, config)`` trains a model
you already hold and returns it (the Python API the quickstart uses).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
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
from clipforge.train.cache import load_or_build_cache
from clipforge.train.config import TrainConfig
from clipforge.train.data import CachedBatches, StreamingBatches, TrainSampleMap, count_samples
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
from clipforge.train.logger import MetricsLogger, plot_curves
from clipforge.train.loss import build_loss
from clipforge.train.optim import build_optimizer, clip_grad, lr_at, set_lr
from clipforge.train.step import embed_images, embed_texts, forward_backward
from clipforge.utils import format_table, setup_torch_threads, write_json

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
    for k in ("img_ids", "txt_ids"):
        if out.get(k) is not None:
            out[k] = out[k].to(device)
    return out


def train(config: TrainConfig | dict | str | Path) -> dict[str, Any]:
    """Build ``config.model`` and train it; returns the result dict (also saved as OUTPUT/result.json)."""
    cfg = TrainConfig.from_any(config)
    model = load_model(cfg.model, **cfg.model_opts)
    return run(model, cfg)


def fit(
    model: ClipModel, shards: str | list[str], config: TrainConfig | dict | str | Path | None = None
) -> ClipModel:
    """Train ``model`` on ``shards`` in place and return it (result dict at ``model.train_result``)."""
    cfg = TrainConfig.from_any(
        {
            **(config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})),
            "data": [shards] if isinstance(shards, str) else list(shards),
        }
    )
    model.train_result = run(model, cfg)
    return model


def run(model: ClipModel, cfg: TrainConfig) -> dict[str, Any]:
    cfg.validate()
    setup_torch_threads(cfg.threads)
    dist = init_distributed(cfg.device)
    try:
        return _run(model, cfg, dist)
    finally:
        cleanup()


def _run(model: ClipModel, cfg: TrainConfig, dist: Any) -> dict[str, Any]:
    rank, world, device = dist.rank, dist.world, dist.device
    out = Path(cfg.output)
    ckpt_root = out / "checkpoints"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    seed_everything(cfg.seed + rank)
    if cfg.batch_size % (world * cfg.accum):
        raise ValueError(
            f"batch size {cfg.batch_size} must divide by world size x accum = {world * cfg.accum}"
        )
    local_batch = cfg.batch_size // world
    prepare_for_loss(model, cfg.loss)
    fsdp = cfg.fsdp and world > 1
    if cfg.fsdp and not fsdp:
        log.warning("fsdp=True with one process: nothing to shard, training unsharded")
    user_model = model
    if fsdp:  # fully_shard rewrites modules in place, for good: train a copy, hand back a plain model
        tok = getattr(model, "tokenizer", None)
        model = copy.deepcopy(model, memo={id(tok): tok})  # (the tokenizer is shared, not copied)
    model.to(device)
    if cfg.grad_checkpointing:
        fn = getattr(model, "set_grad_checkpointing", None)
        if fn is None:
            log.warning("model %s has no set_grad_checkpointing(); flag ignored", type(model).__name__)
        else:
            fn(True)
    if fsdp:
        sharded = shard_model(model, device)
        if not sharded:
            log.warning("fsdp: %s has no trainable tower to shard", type(model).__name__)
        else:
            log.info("fsdp: sharded %d modules over %d ranks: %s", len(sharded), world, ", ".join(sharded))
    embed = (embed_images, embed_texts)
    if cfg.compile:
        embed = (torch.compile(embed_images), torch.compile(embed_texts))
    loss_fn = build_loss(cfg.loss, cfg.local_loss)
    report = BadSampleReport()
    urls = expand_shards(cfg.data)
    if not urls:
        raise ValueError(f"no shards match {cfg.data}")
    n_caps = max(cfg.multi_positive, 1)
    all_caps = cfg.caption_field == "captions"
    tokenize = model.tokenize
    cached = cfg.cache == "auto" and model.image_locked
    cache_dir = None
    show = cfg.progress and dist.main

    if cached:
        root = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / ".feature_cache"
        kw = dict(batch_size=cfg.cache_batch_size, workers=cfg.workers, device=device, progress=show)
        if dist.main:  # rank 0 computes; the others read its files
            data, cache_dir = load_or_build_cache(model, urls, root, report=report, **kw)
        barrier(world)
        if not dist.main:
            data, cache_dir = load_or_build_cache(model, urls, root, report=None, **kw)
        source: Any = CachedBatches(
            data,
            cfg.batch_size,
            tokenize,
            rank=rank,
            world=world,
            seed=cfg.seed,
            n_captions=n_caps,
            all_captions=all_caps,
        )
        steps_per_epoch, n_samples = source.steps_per_epoch, len(data)
    else:
        n_samples = broadcast_object(count_samples(urls) if (dist.main and cfg.epochs) else 0, world)
        steps_per_epoch = max(n_samples // cfg.batch_size, 1)
    total = int(cfg.steps) if cfg.steps else max(int(cfg.epochs * n_samples) // cfg.batch_size, 1)

    optimizer = build_optimizer(model, cfg.lr, cfg.wd, tuple(cfg.betas), cfg.eps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, state = 0, {}
    if cfg.resume:
        last = ckpt.latest_checkpoint(ckpt_root)
        if last is not None:
            state = ckpt.load_checkpoint(last, model, optimizer, rank)
            step = int(state["step"])
            report.counts.clear()  # the checkpoint's report already holds everything counted so far
            report.keys.clear()
            report.merge(state.get("bad", {}))
            log.info("resumed from %s at step %d", last, step)
        else:
            log.info("--resume: no checkpoint in %s, starting fresh", ckpt_root)
    if not cached:
        data_state = state.get("data", {})
        per_rank = data_state.get("loader_batches", [])
        source = StreamingBatches(
            urls,
            local_batch,
            TrainSampleMap(
                model.config.preprocess, cfg.augment and not model.image_locked, n_caps, cfg.seed, all_caps
            ),
            tokenize,
            rank=rank,
            world=world,
            workers=cfg.workers,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            report=report,
            position=data_state.get("position"),
            loader_batches=per_rank[rank] if rank < len(per_rank) else 0,
        )

    metrics = MetricsLogger(out, dist.main, cfg.tensorboard, resume_step=step if state else None)
    keys_log = os.environ.get("CLIPFORGE_DEBUG_KEYS")
    kill_at = int(os.environ.get("CLIPFORGE_DEBUG_KILL_AT_STEP", 0))
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not show, dynamic_ncols=True)
    t0, seen, loss_v = time.perf_counter(), 0, float("nan")
    last_ckpt: Path | None = None

    def save(at: int) -> Path | None:
        data_part: dict[str, Any] = {"mode": "cached" if cached else "streaming"}
        if not cached:
            states = gather_objects(source.state(), world)
            slots: dict[str, Any] = {}
            for s in states:
                slots.update(s["position"]["slots"])
            data_part["position"] = {"nslots": states[0]["position"]["nslots"], "slots": slots}
            data_part["loader_batches"] = [s["loader_batches"] for s in states]
        rngs = gather_objects(ckpt.rng_state(), world)
        full = ckpt.gather_full_state(model, optimizer) if fsdp else None  # a collective
        path = None
        if dist.main:
            meta = {"data": data_part, "bad": report.to_dict(), "config": cfg.to_dict(), "world": world}
            path = ckpt.save_checkpoint(
                ckpt_root, at, model, optimizer, meta, rngs, keep=cfg.keep_checkpoints, full=full
            )
        barrier(world)
        return path

    while step < total:
        lr = lr_at(step, cfg.lr, cfg.warmup, total, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        batch = source.batch(step) if cached else source.next()
        if keys_log:
            with open(f"{keys_log}.rank{rank}", "a") as f:
                f.write(json.dumps({"step": step + 1, "keys": batch["keys"]}) + "\n")
        batch = _to(batch, device)
        set_train_mode(model)
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, loss_fn, batch, cfg.accum, device, cfg.precision, embed=embed)
        all_reduce_grads(trainable, world)
        gnorm = clip_grad(trainable, cfg.grad_clip)
        optimizer.step()
        step += 1
        seen += cfg.batch_size
        loss_v = mean_across(float(loss), world, device)
        sps = seen / max(time.perf_counter() - t0, 1e-9)
        epoch = batch.get("epoch", step // max(steps_per_epoch, 1)) if cached else source.epoch
        if step % cfg.log_every == 0 or step == total:
            metrics.log(
                {
                    "step": step,
                    "epoch": int(epoch),
                    "loss": loss_v,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "scale": float(model.logit_scale.detach().exp()),
                    "samples_per_s": sps,
                }
            )
        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.0f}")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            last_ckpt = save(step)
        if kill_at and step == kill_at:  # test hook: die like kill -9 (no cleanup, no flush)
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    elapsed = time.perf_counter() - t0
    last_ckpt = save(step) if total > 0 else last_ckpt
    metrics.close()
    if fsdp:  # every rank's caller gets the trained weights, unsharded, on the model's own device
        user_model.load_state_dict(
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        )
        model = user_model
    result: dict[str, Any] = {
        "steps": step,
        "final_loss": loss_v,
        "samples_per_s": seen / max(elapsed, 1e-9) if seen else 0.0,
        "train_seconds": elapsed,
        "world_size": world,
        "mode": "cached" if cached else "streaming",
        "samples": n_samples,
        "steps_per_epoch": steps_per_epoch,
        "output": str(out),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "bad_samples": report.to_dict()["counts"],
    }
    if dist.main:
        result["model_dir"] = str(model.save(out / "model"))
        report.save(out / "bad_samples.json")
        png = plot_curves(out / "metrics.jsonl", out / "curves.png")
        result["metrics"] = str(out / "metrics.jsonl")
        result["curve"] = str(png) if png else None
        write_json(out / "result.json", result)
        log.info(
            "\n%s",
            format_table([[k, v] for k, v in result.items() if not isinstance(v, dict)], ["key", "value"]),
        )
    return result
