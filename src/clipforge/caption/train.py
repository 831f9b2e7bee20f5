"""``clipforge caption train``: fit a prefix decoder on cached condition vectors.

    --mode paired     image condition (frozen-tower features or CLIP embedding) -> one of its captions
    --mode text-only  CapDec: the decoder reconstructs a caption from a *text* embedding plus Gaussian
                      noise (sigma ``noise_std``), so image embeddings land in-distribution at
                      inference; CLOSE: the input embedding is another caption of the same image
                      (flickr8k has 5); DeCap's projection onto the training text embeddings is stored
                      with the captioner (``memory.safetensors``) and applied at inference.

    --condition spatial  (paired) Show-Attend-Tell / CoCa: every decoder block cross-attends to the
                      locked tower's spatial tokens (EfficientNet-Lite0: 7x7x1280, float16 token cache
                      of caption/spatial.py); the prefix reads their mean.

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
from clipforge.caption.vocab import TOKENIZERS, CaptionVocab, build_vocab, wordpiece_vocab
from clipforge.config import ConfigError, check_run_config, from_dict, to_dict, write_run_config
from clipforge.models.encode import autocast
from clipforge.utils import prepare_output_dir, write_json

log = logging.getLogger(__name__)
MODES = ("paired", "text-only")
CONDITIONS = ("auto", "features", "embedding", "spatial")


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
            "help": "features | embedding | spatial | auto (paired: features of a locked tower; text-only: "
            "embedding). spatial: a cross-attention decoder over the locked tower's spatial tokens "
            "(EfficientNet-Lite0: 7x7x1280), cached as float16 like the features",
            "choices": CONDITIONS,
        },
    )
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokenizer: str = field(
        default="word",
        metadata={
            "help": "word: the training captions' words | wordpiece: the text tower's WordPiece, trimmed "
            "to pieces seen >= min_count times (min_count 0: all 30,522)",
            "choices": TOKENIZERS,
        },
    )
    min_count: int = field(default=5, metadata={"help": "words (pieces) seen fewer times map to [UNK]"})
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
    noise_std: float = field(
        default=0.05,
        metadata={
            "help": "text-only: CapDec noise sigma. Measured on flickr8k val, beam-3 CIDEr-D: at 15 CPU min "
            "(~6 epochs, the default length) 0.05 reaches 0.360, 0.01 0.246 (it overfits the exact text "
            "embeddings); at 1.5 CPU min 0.005-0.02 lead (~0.28) and the paper's 0.126 trails"
        },
    )
    cross_caption: bool = field(default=True, metadata={"help": "text-only: CLOSE cross-caption targets"})
    decap_temperature: float = field(
        default=0.0, metadata={"help": "text-only: DeCap projection temperature stored as default (0: off)"}
    )
    consensus_memory: bool = field(
        default=True,
        metadata={
            "help": "save the training vectors + captions with the captioner (consensus.safetensors: "
            "paired ~15 MB, text-only ~25 MB for flickr8k) so decoding can rerank by consensus"
        },
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
        if self.condition not in CONDITIONS:
            raise ConfigError(f"condition {self.condition!r}: one of {', '.join(CONDITIONS)}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer {self.tokenizer!r}: one of {', '.join(TOKENIZERS)}")
        if self.decoder.cross_grid and self.condition != "spatial":
            raise ConfigError("decoder.cross_grid pools spatial tokens: it needs condition=spatial")
        if self.mode == "text-only" and self.condition in ("features", "spatial"):
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
    """(condition [B, C] or image tokens [B, T, C], tokens [B, L]) of a batch of pair indices."""
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
    cfg = from_dict(CaptionTrainConfig, cfg)
    if not cfg.data:
        raise ConfigError("caption train needs --data SHARDS")
    trainer = CaptionTrainer(cfg, resume=resume, overwrite=overwrite, progress=progress, prepared=prepared)
    return trainer.train()


# what a resumed run may change: where things live, how long it runs, how fast, how often it evaluates
RESUME_MAY_CHANGE = {
    "output", "cache_dir", "feature_cache", "max_steps", "wall_budget_minutes", "threads", "workers", "eval_every",
    "consensus_memory",
    "decoder.cross_dim", "decoder.cross_tokens", "decoder.cross_grid",  # added later; 0 = what older runs had
}  # fmt: skip


class CaptionTrainer:
    """One run. ``__init__`` is the setup (the order matters: the seed is set before the decoder is
    built); :meth:`train` runs the loop over :meth:`train_step` and ends in :meth:`finish`."""

    def __init__(
        self,
        cfg: CaptionTrainConfig,
        *,
        resume: bool,
        overwrite: bool,
        progress: bool,
        prepared: Prepared | None,
    ) -> None:
        from clipforge.runtime import setup_process
        from clipforge.train.logger import MetricsLogger
        from clipforge.train.optim import build_optimizer

        self.cfg, self.progress = cfg, progress
        self.threads = setup_process(cfg.threads)
        self.out, self.ckpt = self._prepare_dir(resume, overwrite)
        torch.manual_seed(cfg.seed)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        prepared = prepared or Prepared()
        self.encoder, self.kind, self.ts = self._load_data(prepared)
        self.prep_s = time.perf_counter() - self.t0
        self.vocab = self._load_vocab()
        self.model, self.pairs = self._build_model()
        self._consensus: Any = None  # built on first use by captioner()
        self.per_epoch = math.ceil(len(self.pairs) / cfg.batch_size)
        self.total = cfg.max_steps or max(1, int(cfg.epochs * self.per_epoch))
        self.opt = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.step = self._resume()
        resume_step = self.step if self.ckpt else None
        self.logger = MetricsLogger(self.out, enabled=True, tensorboard=False, resume_step=resume_step)
        self.meta = self._meta()
        self.evaluator = (
            _Evaluator(cfg, self.encoder, self.kind, self.out, self.step, prepared.eval)
            if cfg.eval_data
            else None
        )
        self.model.train()
        self.prep_cpu = time.process_time() - self.c0
        self._start_clocks()

    # -- setup -------------------------------------------------------------------------------------

    def _prepare_dir(self, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
        """The output dir and the checkpoint to resume from; a resumed run must keep its config."""
        from clipforge.train.checkpoint import latest_checkpoint

        out = prepare_output_dir(self.cfg.output, overwrite=overwrite, resume=resume)
        ckpt = latest_checkpoint(out / "checkpoints") if resume else None
        if resume:
            check_run_config(out / "config.yaml", self.cfg, ignore=RESUME_MAY_CHANGE)
        write_run_config(out / "config.yaml", self.cfg)
        return out, ckpt

    def _load_data(self, prepared: Prepared) -> tuple[Any, str, TrainingSet]:
        """The encoder, the condition kind and the training conditions (from the feature cache)."""
        from clipforge.models import load_model

        cfg = self.cfg
        # the model spec is the caller's own argument: a py: spec may run its code
        encoder = prepared.encoder or load_model(cfg.model, allow_code=True, **cfg.model_opts)
        kind = _resolve_condition(cfg, encoder)
        cache_root = (
            (Path(cfg.cache_dir) if cfg.cache_dir else self.out.parent / ".feature_cache")
            if cfg.feature_cache
            else None
        )
        if prepared.train is not None:
            return encoder, kind, prepared.train
        if kind == "spatial":
            from clipforge.caption.spatial import spatial_training_set

            ts = spatial_training_set(
                encoder, cfg.data, cache_root=cache_root, workers=cfg.workers, progress=self.progress
            )
        else:
            ts = training_set(
                encoder, cfg.data, kind, text=cfg.mode == "text-only", cache_root=cache_root,
                workers=cfg.workers, progress=self.progress,
            )  # fmt: skip
        return encoder, kind, ts

    def _load_vocab(self) -> CaptionVocab:
        """A resumed run keeps its vocabulary; a new one builds it from the training captions."""
        vocab_path = self.out / "vocab.json"
        if self.ckpt is not None and vocab_path.is_file():
            return CaptionVocab.load(vocab_path)
        captions = (c for caps in self.ts.cond.captions for c in caps)
        if self.cfg.tokenizer == "wordpiece":
            backend = getattr(getattr(self.encoder, "tokenizer", None), "backend", None)
            if backend is None:
                raise ConfigError(
                    f"tokenizer=wordpiece: the encoder {self.cfg.model} has no tokenizers backend"
                )
            vocab = wordpiece_vocab(backend, captions, self.cfg.min_count)
        else:
            vocab = build_vocab(captions, self.cfg.min_count)
        vocab.save(vocab_path)
        return vocab

    def _build_model(self) -> tuple[CaptionDecoder, Pairs]:
        # set by the data: the vocabulary, the condition width and (spatial) the image tokens per image
        cond = self.ts.cond.cond
        spatial = self.kind == "spatial"
        dcfg = from_dict(DecoderConfig, {**to_dict(self.cfg.decoder), "vocab_size": len(self.vocab),
                                         "cond_dim": int(cond.shape[-1]),
                                         "cross_dim": int(cond.shape[-1]) if spatial else 0,
                                         "cross_tokens": self._cross_tokens(cond) if spatial else 0})  # fmt: skip
        # the decoder's init and dropout depend on the seed only, not on the encoder
        torch.manual_seed(self.cfg.seed)
        model = CaptionDecoder(dcfg)
        return model, make_pairs(self.ts.cond.captions, self.vocab, dcfg.max_len)

    def _cross_tokens(self, cond: torch.Tensor) -> int:
        """Image tokens the decoder attends to: the cached ones, or ``cross_grid`` squared (pooled)."""
        grid = self.cfg.decoder.cross_grid
        return grid * grid if grid else int(cond.shape[1])

    def _resume(self) -> int:
        """The step of the checkpoint resumed from (model and optimizer loaded), else 0."""
        from clipforge.train.checkpoint import load_checkpoint

        if self.ckpt is None:
            return 0
        step = int(load_checkpoint(self.ckpt, self.model, self.opt, rank=0)["step"])
        log.info("resumed from %s (step %d)", self.ckpt, step)
        return step

    def _meta(self) -> dict[str, Any]:
        """What the saved captioner records about its encoder and training data."""
        cfg = self.cfg
        return {
            "mode": cfg.mode,
            "encoder": {"model": cfg.model, "model_opts": cfg.model_opts, "condition": self.kind,
                        "fingerprint": encoder_fingerprint(self.encoder, self.kind)},
            "decap_temperature": cfg.decap_temperature if cfg.mode == "text-only" else None,
            "train": {"data": cfg.data, "images": len(self.ts.cond), "pairs": len(self.pairs)},
        }  # fmt: skip

    def _start_clocks(self) -> None:
        """Decoder-training CPU excludes setup and evaluation, and continues the count of the run
        before a checkpoint; the budgets are shares of it (and of wall time)."""
        from clipforge.train.logger import MetricsLogger

        cfg, out = self.cfg, self.out
        self.c1, self.eval_cpu = time.process_time(), 0.0
        if self.ckpt is not None:
            rows = MetricsLogger.read(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            self.c1 -= float(rows[-1].get("train_cpu_s", 0.0)) if rows else 0.0
        self.batches: list[torch.Tensor] = []
        self.epoch = -1
        self.loss_sum, self.loss_n, self.tick = 0.0, 0, time.perf_counter()
        self.budget = 60 * cfg.cpu_budget_minutes if cfg.cpu_budget_minutes else None
        self.wall_budget = 60 * cfg.wall_budget_minutes if cfg.wall_budget_minutes else None
        self.w1 = time.perf_counter()

    # -- clocks --------------------------------------------------------------------------------------

    def train_cpu(self) -> float:
        return time.process_time() - self.c1 - self.eval_cpu

    def spent(self) -> float | None:
        """Share of the budget spent (the larger of CPU and wall when both are set); None: no budget."""
        shares = [self.train_cpu() / self.budget] if self.budget else []
        shares += [(time.perf_counter() - self.w1) / self.wall_budget] if self.wall_budget else []
        return max(shares) if shares else None

    # -- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        while self.step < self.total:
            frac = self.spent()
            if frac is not None and frac >= 1.0:  # the budget is spent: stop here
                self.total = self.step
                break
            lr, gnorm = self.train_step(frac)
            last = self.step == self.total or (frac is not None and (self.spent() or 0.0) >= 1.0)
            if self.step % self.cfg.log_every == 0 or last:
                self._log(lr, gnorm)
            if self.step % self.cfg.ckpt_every == 0 and not last:
                self.save()
            every = self.cfg.eval_every
            if self.evaluator is not None and every and self.step % every == 0 and not last:
                self._evaluate()
        return self.finish()

    def next_batch(self) -> torch.Tensor:
        """Pair indices of this step's batch (a new epoch's batches when the step enters one)."""
        if self.step // self.per_epoch != self.epoch:
            self.epoch = self.step // self.per_epoch
            self.batches = epoch_batches(self.pairs, self.cfg.batch_size, self.cfg.seed, self.epoch)
        return self.batches[self.step % self.per_epoch]

    def train_step(self, frac: float | None) -> tuple[float, Any]:
        """One optimizer step; returns (lr, grad norm). ``frac``: the budget share spent, None: none."""
        from clipforge.train.optim import clip_grad, lr_at, set_lr

        cfg, pad = self.cfg, self.vocab.pad_id
        cond, tokens = batch_inputs(
            self.next_batch(), self.pairs, self.ts.cond.cond, self.ts.text, cfg, self.step, pad
        )
        if frac is None:
            lr = lr_at(self.step, cfg.lr, cfg.warmup, self.total, cfg.min_lr_ratio)
        else:
            lr = lr_by_fraction(self.step, frac, cfg)
        set_lr(self.opt, lr)
        with autocast(cfg.precision):
            loss = caption_loss(self.model, cond, tokens, pad, cfg.label_smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.loss_sum, self.loss_n = self.loss_sum + loss.item(), self.loss_n + 1
        return lr, gnorm

    def _log(self, lr: float, gnorm: Any) -> None:
        """A metrics.jsonl row: the mean loss since the previous row."""
        step, loss = self.step, self.loss_sum / self.loss_n
        dt = time.perf_counter() - self.tick
        self.logger.log({"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                         "epoch": step / self.per_epoch, "steps_per_s": self.loss_n / max(dt, 1e-9),
                         "train_cpu_s": self.train_cpu()})  # fmt: skip
        if self.progress:
            log.info("step %d/%d loss %.4f lr %.2e", step, self.total, loss, lr)
        self.loss_sum, self.loss_n, self.tick = 0.0, 0, time.perf_counter()

    def _evaluate(self) -> None:
        """Score the captioner so far; its CPU is not training CPU."""
        assert self.evaluator is not None
        e0 = time.process_time()
        self.evaluator(self.captioner(), self.step, self.train_cpu())
        self.eval_cpu += time.process_time() - e0

    def save(self) -> None:
        """A checkpoint at the current step (model, optimizer, RNG, step): a resume continues exactly."""
        from clipforge.train.checkpoint import rng_state, save_checkpoint

        state = {"epoch": self.step // self.per_epoch, "config": to_dict(self.cfg)}
        save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self.model,
            self.opt,
            state,
            [rng_state()],
            keep=self.cfg.keep,
        )

    def captioner(self) -> Captioner:
        memory = self.ts.text.half() if self.ts.text is not None else None
        cap = Captioner(self.model, self.vocab, self.meta, memory)
        if self.cfg.consensus_memory:
            if self._consensus is None:
                from clipforge.caption.rerank import ConsensusMemory

                c = self.ts.cond
                self._consensus = ConsensusMemory.of_training(self.cfg.mode, c.cond, c.captions, self.ts.text)
            cap.consensus = self._consensus
        return cap

    # -- the end -------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Last checkpoint, curves, the captioner, the final evaluation and OUTPUT/summary.json."""
        from clipforge.train.logger import plot_curves

        out = self.out
        self.save()
        self.logger.close()
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        cap_dir = self.captioner().save(out / "captioner")
        times = {"wall_s": time.perf_counter() - self.t0, "cpu_s": time.process_time() - self.c0}
        summary = self._summary(cap_dir, times, self.train_cpu())
        if self.evaluator is not None:
            summary["eval"] = self.evaluator(self.captioner(), self.step, summary["train_cpu_s"])
        write_json(out / "summary.json", summary)
        return summary

    def _summary(self, cap_dir: Path, times: dict[str, float], cpu: float) -> dict[str, Any]:
        from clipforge.train.logger import MetricsLogger

        step, out = self.step, self.out
        return {
            "output": str(out),
            "captioner": str(cap_dir),
            "mode": self.cfg.mode,
            "condition": self.kind,
            "steps": step,
            "epochs": step / self.per_epoch,
            "params": self.model.num_params(),
            "vocab_size": len(self.vocab),
            "train_images": len(self.ts.cond),
            "train_pairs": len(self.pairs),
            "feature_cache": self.ts.cache_dir,
            "prepare_s": self.prep_s,
            "wall_s": times["wall_s"],
            "cpu_s": times["cpu_s"],
            "prepare_cpu_s": self.prep_cpu,
            "train_cpu_s": cpu,
            "threads": self.threads,
            "final_loss": MetricsLogger.read(out / "metrics.jsonl")[-1]["loss"] if step else None,
            "bad_samples": self.ts.cond.bad.to_dict(),
        }


class _Evaluator:
    """Scores the captioner on ``eval_data`` during training: rows of OUTPUT/eval.jsonl (the curve
    of BLEU-4/CIDEr-D against CPU time). Conditions are computed once."""

    def __init__(
        self, cfg: CaptionTrainConfig, encoder: Any, kind: str, out: Path, resume_step: int, c: Any = None
    ) -> None:
        from clipforge.caption.features import conditions_of_kind

        self.cfg, self.path = cfg, out / "eval.jsonl"
        if c is None:  # the shard loop draws a seed from the global RNG: keep the run's (exact resume)
            with torch.random.fork_rng(devices=[]):
                c = conditions_of_kind(encoder, cfg.eval_data, kind, workers=cfg.workers)
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
