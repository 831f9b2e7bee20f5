"""``clipforge caption train``: fit a prefix decoder on cached condition vectors.

    --mode paired     image condition (frozen-tower features or CLIP embedding) -> one of its captions
    --mode text-only  CapDec: the decoder reconstructs a caption from a *text* embedding plus Gaussian
                      noise (sigma ``noise_std``), so image embeddings land in-distribution at
                      inference; CLOSE: the input embedding is another caption of the same image
                      (flickr8k has 5); DeCap's projection onto the training text embeddings is stored
                      with the captioner (``memory.safetensors``) and applied at inference.

Conditions come from the locked-tower feature cache, so a step costs only the decoder (a 4-layer,
width-256 decoder over a ~2,500-word vocabulary runs at CPU speed). Batches are length-bucketed:
each epoch's (image, caption) pairs are shuffled, cut into chunks of 50 batches, sorted by length in
a chunk and cut into batches whose order is shuffled again - far less padding, same randomness.

The trainer's own pieces are reused: ``train/checkpoint.py`` (atomic safetensors checkpoints with
optimizer, RNG and step: exact resume), ``train/logger.py`` (metrics.jsonl, curves.png),
``train/optim.py`` (AdamW groups, warmup + cosine). Everything random is a function of
(seed, epoch) or (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.caption.captioner import Captioner, encoder_fingerprint
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.features import Conditions, TrainingSet, training_set
from clipforge.caption.vocab import CaptionVocab, build_vocab
from clipforge.config import ConfigError, check_run_config, from_dict, to_dict, write_run_config
from clipforge.models.encode import autocast
from clipforge.utils import prepare_output_dir, write_json

log = logging.getLogger(__name__)
MODES = ("paired", "text-only")


@dataclass
class CaptionTrainConfig:
    data: list[str] = field(default_factory=list, metadata={"help": "training shards (with captions)"})
    output: str = field(default="runs/caption", metadata={"help": "run dir (captioner in OUTPUT/captioner)"})
    mode: str = field(default="paired", metadata={"help": "paired | text-only", "choices": MODES})
    model: str = field(
        default="towers:efficientnet-lite0+minilm-l6", metadata={"help": "CLIP model spec or dir (encoder)"}
    )
    model_opts: dict = field(default_factory=dict, metadata={"help": "options for a model spec"})
    condition: str = field(
        default="auto",
        metadata={
            "help": "features | embedding | auto (paired: features of a locked tower; text-only: embedding)",
            "choices": ("auto", "features", "embedding"),
        },
    )
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    min_count: int = field(default=5, metadata={"help": "words seen fewer times map to [UNK]"})
    epochs: float = field(default=6.0, metadata={"help": "passes over all (image, caption) pairs"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps"})
    cpu_budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "decoder-training CPU minutes: cosine over the spent share, stop when spent "
            "(then a resume is not bit-exact: the schedule follows measured time)"
        },
    )
    wall_budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "decoder-training wall minutes (a shared machine); with a CPU budget too, the "
            "schedule follows whichever is spent first"
        },
    )
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    min_lr_ratio: float = 0.0
    label_smoothing: float = field(default=0.1, metadata={"help": "guards against collapse to 'a a a'"})
    grad_clip: float = 1.0
    noise_std: float = field(default=0.126, metadata={"help": "text-only: CapDec noise sigma (var 0.016)"})
    cross_caption: bool = field(default=True, metadata={"help": "text-only: CLOSE cross-caption targets"})
    decap_temperature: float = field(
        default=0.0, metadata={"help": "text-only: DeCap projection temperature stored as default (0: off)"}
    )
    log_every: int = 20
    ckpt_every: int = 500
    keep: int = 2
    eval_data: list[str] = field(default_factory=list, metadata={"help": "shards scored during training"})
    eval_every: int = field(default=0, metadata={"help": "steps between eval_data scores (0: end only)"})
    eval_limit: int = field(default=1000, metadata={"help": "images of eval_data scored"})
    decode: DecodeOptions = field(default_factory=lambda: DecodeOptions(method="greedy"))
    precision: str = field(
        default="fp32",
        metadata={
            "help": "fp32 | bf16 | auto: bf16 autocast of the decoder (1.5x less CPU per step on "
            "AVX512-BF16 CPUs; weights and optimizer stay fp32)",
            "choices": ("fp32", "bf16", "auto"),
        },
    )
    seed: int = 0
    threads: int | None = None
    workers: int = 1
    feature_cache: bool = field(
        default=True,
        metadata={
            "help": "use the locked-tower feature cache (it also caches text features of every caption, "
            "reused by text-only runs); off: encode the images once, in memory"
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "feature cache (default OUTPUT/../.feature_cache)"}
    )

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.condition not in ("auto", "features", "embedding"):
            raise ConfigError(f"condition {self.condition!r}: features | embedding | auto")
        if self.mode == "text-only" and self.condition == "features":
            raise ConfigError("text-only captioners read embeddings (a text has no image features)")
        for name in ("cpu_budget_minutes", "wall_budget_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.batch_size < 1 or self.epochs <= 0 or self.noise_std < 0:
            raise ConfigError("batch_size >= 1, epochs > 0 and noise_std >= 0 are required")


# -- data: tokenized pairs and length-bucketed batches ---------------------------------------------


@dataclass
class Pairs:
    """Every (image, caption) pair: ``image[i]`` the image row, ``caption[i]`` the flat caption row."""

    image: torch.Tensor
    caption: torch.Tensor
    tokens: list[list[int]]  # per flat caption: BOS .. EOS, truncated to the decoder's max_len
    offsets: torch.Tensor  # [N + 1]: captions of image i are rows offsets[i]:offsets[i+1]

    def __len__(self) -> int:
        return len(self.image)


def make_pairs(captions: list[list[str]], vocab: CaptionVocab, max_len: int) -> Pairs:
    flat = [c for caps in captions for c in caps]
    tokens = [t[: max_len - 1] + [vocab.eos_id] if len(t) > max_len else t for t in vocab.encode(flat)]
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    image = torch.arange(len(captions)).repeat_interleave(counts)
    return Pairs(image, torch.arange(len(flat)), tokens, offsets)


def epoch_batches(
    pairs: Pairs, batch_size: int, seed: int, epoch: int, chunk: int = 50
) -> list[torch.Tensor]:
    """Pair indices per batch for one epoch: shuffled, length-bucketed within chunks, order shuffled."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(pairs), generator=g).tolist()
    batches = []
    for s in range(0, len(perm), batch_size * chunk):
        part = sorted(perm[s : s + batch_size * chunk], key=lambda i: len(pairs.tokens[i]))
        batches += [torch.tensor(part[j : j + batch_size]) for j in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def pad_tokens(rows: list[list[int]], pad: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def batch_inputs(
    idx: torch.Tensor, pairs: Pairs, cond: torch.Tensor, text: torch.Tensor | None, cfg: CaptionTrainConfig,
    step: int, pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(condition [B, C], tokens [B, L]) of a batch of pair indices."""
    tokens = pad_tokens([pairs.tokens[int(i)] for i in idx], pad)
    if cfg.mode == "paired":
        return cond[pairs.image[idx]], tokens
    assert text is not None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    src = pairs.caption[idx]
    if cfg.cross_caption:  # CLOSE: encode another caption of the same image
        lo, hi = pairs.offsets[pairs.image[idx]], pairs.offsets[pairs.image[idx] + 1]
        n = hi - lo
        shift = 1 + (torch.rand(len(idx), generator=g) * (n - 1).clamp(min=1)).long()
        src = torch.where(n > 1, lo + (src - lo + shift) % n, src)
    x = text[src]
    return x + cfg.noise_std * torch.randn(x.shape, generator=g), tokens


# -- the loop ----------------------------------------------------------------------------------------


def lr_by_fraction(step: int, frac: float, cfg: CaptionTrainConfig) -> float:
    """Warmup over steps, then cosine decay over the spent share of the CPU budget."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    r = cfg.min_lr_ratio
    return cfg.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0))))


@dataclass
class Prepared:
    """What :func:`train_captioner` would otherwise compute itself."""

    encoder: Any = None
    train: TrainingSet | None = None
    eval: Conditions | None = None


def caption_loss(model: CaptionDecoder, cond: torch.Tensor, tokens: torch.Tensor, pad: int, smoothing: float):
    logits = model(cond, tokens)[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=pad,
        label_smoothing=smoothing,
    )  # fmt: skip


def _resolve_condition(cfg: CaptionTrainConfig, model: Any) -> str:
    if cfg.condition != "auto":
        return cfg.condition
    return "features" if cfg.mode == "paired" and model.image_locked else "embedding"


def train_captioner(
    cfg: CaptionTrainConfig | dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Train (or resume) a captioner; returns the run summary (also written to OUTPUT/summary.json).

    ``prepared``: the encoder and conditions when the caller already holds them (a benchmark that
    also scores baselines); they must come from ``cfg.model`` / ``cfg.data`` / ``cfg.eval_data``.
    """
    from clipforge.models import load_model
    from clipforge.runtime import setup_process
    from clipforge.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
    from clipforge.train.logger import MetricsLogger, plot_curves
    from clipforge.train.optim import build_optimizer, clip_grad, lr_at, set_lr

    cfg = from_dict(CaptionTrainConfig, cfg)
    if not cfg.data:
        raise ConfigError("caption train needs --data SHARDS")
    threads = setup_process(cfg.threads)
    out = prepare_output_dir(cfg.output, overwrite=overwrite, resume=resume)
    ckpt_root = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume:
        check_run_config(
            out / "config.yaml",
            cfg,
            ignore={
                "output",
                "cache_dir",
                "feature_cache",
                "max_steps",
                "wall_budget_minutes",
                "threads",
                "workers",
                "eval_every",
            },
        )
    write_run_config(out / "config.yaml", cfg)
    torch.manual_seed(cfg.seed)
    t0, c0 = time.perf_counter(), time.process_time()

    prepared = prepared or Prepared()
    encoder = prepared.encoder or load_model(cfg.model, allow_code=True, **cfg.model_opts)  # caller's spec
    kind = _resolve_condition(cfg, encoder)
    cache_root = (
        (Path(cfg.cache_dir) if cfg.cache_dir else out.parent / ".feature_cache")
        if cfg.feature_cache
        else None
    )
    ts = prepared.train or training_set(
        encoder, cfg.data, kind, text=cfg.mode == "text-only", cache_root=cache_root, workers=cfg.workers,
        progress=progress,
    )  # fmt: skip
    prep_s = time.perf_counter() - t0
    vocab_path = out / "vocab.json"
    if ckpt is not None and vocab_path.is_file():
        vocab = CaptionVocab.load(vocab_path)
    else:
        vocab = build_vocab((c for caps in ts.cond.captions for c in caps), cfg.min_count)
        vocab.save(vocab_path)
    dcfg = from_dict(DecoderConfig, {**to_dict(cfg.decoder), "vocab_size": len(vocab),
                                     "cond_dim": int(ts.cond.cond.shape[1])})  # fmt: skip
    torch.manual_seed(cfg.seed)  # the decoder's init and dropout depend on the seed only, not on the encoder
    model = CaptionDecoder(dcfg)
    pairs = make_pairs(ts.cond.captions, vocab, dcfg.max_len)
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * per_epoch))
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step = 0
    if ckpt is not None:
        step = int(load_checkpoint(ckpt, model, opt, rank=0)["step"])
        log.info("resumed from %s (step %d)", ckpt, step)
    logger = MetricsLogger(out, enabled=True, tensorboard=False, resume_step=step if ckpt else None)
    meta = {
        "mode": cfg.mode,
        "encoder": {"model": cfg.model, "model_opts": cfg.model_opts, "condition": kind,
                    "fingerprint": encoder_fingerprint(encoder, kind)},
        "decap_temperature": cfg.decap_temperature if cfg.mode == "text-only" else None,
        "train": {"data": cfg.data, "images": len(ts.cond), "pairs": len(pairs)},
    }  # fmt: skip
    evaluator = _Evaluator(cfg, encoder, kind, out, step, prepared.eval) if cfg.eval_data else None

    def save(s: int) -> None:
        state = {"epoch": s // per_epoch, "config": to_dict(cfg)}
        save_checkpoint(ckpt_root, s, model, opt, state, [rng_state()], keep=cfg.keep)

    def captioner() -> Captioner:
        memory = ts.text.half() if ts.text is not None else None
        return Captioner(model, vocab, meta, memory)

    model.train()
    prep_cpu = time.process_time() - c0
    c1, eval_cpu = time.process_time(), 0.0  # decoder-training CPU: excludes setup and evaluation
    if ckpt is not None:  # continue the CPU count of the run before the checkpoint
        rows = MetricsLogger.read(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        c1 -= float(rows[-1].get("train_cpu_s", 0.0)) if rows else 0.0

    def train_cpu() -> float:
        return time.process_time() - c1 - eval_cpu

    batches: list[torch.Tensor] = []
    epoch = -1
    loss_sum, loss_n, tick = 0.0, 0, time.perf_counter()
    budget = 60 * cfg.cpu_budget_minutes if cfg.cpu_budget_minutes else None
    wall_budget = 60 * cfg.wall_budget_minutes if cfg.wall_budget_minutes else None
    w1 = time.perf_counter()

    def spent() -> float | None:
        """Share of the budget spent (the larger of CPU and wall when both are set); None: no budget."""
        shares = [train_cpu() / budget] if budget else []
        shares += [(time.perf_counter() - w1) / wall_budget] if wall_budget else []
        return max(shares) if shares else None

    while step < total:
        frac = spent()
        if frac is not None and frac >= 1.0:  # the budget is spent: stop here
            total = step
            break
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(pairs, cfg.batch_size, cfg.seed, epoch)
        idx = batches[step % per_epoch]
        cond, tokens = batch_inputs(idx, pairs, ts.cond.cond, ts.text, cfg, step, vocab.pad_id)
        if frac is None:
            lr = lr_at(step, cfg.lr, cfg.warmup, total, cfg.min_lr_ratio)
        else:
            lr = lr_by_fraction(step, frac, cfg)
        set_lr(opt, lr)
        with autocast(cfg.precision):
            loss = caption_loss(model, cond, tokens, vocab.pad_id, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        last = step == total or (frac is not None and (spent() or 0.0) >= 1.0)
        if step % cfg.log_every == 0 or last:
            dt = time.perf_counter() - tick
            logger.log({"step": step, "loss": loss_sum / loss_n, "lr": lr, "grad_norm": gnorm,
                        "epoch": step / per_epoch, "steps_per_s": loss_n / max(dt, 1e-9),
                        "train_cpu_s": train_cpu()})  # fmt: skip
            if progress:
                log.info("step %d/%d loss %.4f lr %.2e", step, total, loss_sum / loss_n, lr)
            loss_sum, loss_n, tick = 0.0, 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 and not last:
            save(step)
        if evaluator is not None and cfg.eval_every and step % cfg.eval_every == 0 and not last:
            e0 = time.process_time()
            evaluator(captioner(), step, train_cpu())
            eval_cpu += time.process_time() - e0
    save(step)
    logger.close()
    plot_curves(out / "metrics.jsonl", out / "curves.png")
    cap_dir = captioner().save(out / "captioner")
    train_s, total_cpu, cpu = time.perf_counter() - t0, time.process_time() - c0, train_cpu()
    summary: dict[str, Any] = {
        "output": str(out),
        "captioner": str(cap_dir),
        "mode": cfg.mode,
        "condition": kind,
        "steps": step,
        "epochs": step / per_epoch,
        "params": model.num_params(),
        "vocab_size": len(vocab),
        "train_images": len(ts.cond),
        "train_pairs": len(pairs),
        "feature_cache": ts.cache_dir,
        "prepare_s": prep_s,
        "wall_s": train_s,
        "cpu_s": total_cpu,
        "prepare_cpu_s": prep_cpu,
        "train_cpu_s": cpu,
        "threads": threads,
        "final_loss": MetricsLogger.read(out / "metrics.jsonl")[-1]["loss"] if step else None,
        "bad_samples": ts.cond.bad.to_dict(),
    }
    if evaluator is not None:
        summary["eval"] = evaluator(captioner(), step, cpu)
    write_json(out / "summary.json", summary)
    return summary


class _Evaluator:
    """Scores the captioner on ``eval_data`` during training: rows of OUTPUT/eval.jsonl (the curve
    of BLEU-4/CIDEr-D against CPU time). Conditions are computed once."""

    def __init__(
        self, cfg: CaptionTrainConfig, encoder: Any, kind: str, out: Path, resume_step: int, c: Any = None
    ) -> None:
        from clipforge.caption.features import shard_conditions

        self.cfg, self.path = cfg, out / "eval.jsonl"
        c = c or shard_conditions(encoder, cfg.eval_data, kind, workers=cfg.workers)
        n = min(cfg.eval_limit, len(c))
        self.cond, self.keys, self.refs = c.cond[:n], c.keys[:n], c.captions[:n]
        if self.path.exists():  # a resumed run keeps the rows up to its checkpoint
            from clipforge.train.logger import MetricsLogger

            rows = [r for r in MetricsLogger.read(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def __call__(self, cap: Captioner, step: int, cpu_s: float) -> dict[str, Any]:
        from clipforge.caption.metrics import caption_stats, coco_scores

        texts, _ = cap.caption(self.cond, self.cfg.decode)
        scores = coco_scores(dict(zip(self.keys, texts)), dict(zip(self.keys, self.refs)), meteor=False)
        row = {"step": step, "train_cpu_minutes": cpu_s / 60, **scores, **caption_stats(texts)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("eval step %d: BLEU-4 %.4f CIDEr-D %.4f", step, scores["bleu4"], scores["cider_d"])
        return row
