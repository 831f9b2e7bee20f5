"""TrainConfig: every knob of a run in one dataclass, from a dict, a YAML file or generated CLI flags.

It follows clipforge.config's one convention: unknown keys fail with a did-you-mean, the defaults live
here only, ``train/cli.py`` generates one flag per field (help from the field metadata), and the
resolved config is written as ``OUTPUT/config.yaml``; a ``--resume`` checks it against that file
(:data:`RESUME_MAY_CHANGE` lists what may differ) so a resumed run continues the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.config import ConfigError, check_run_config, from_dict, load_file, to_dict, write_run_config
from clipforge.config import opt as _f


@dataclass
class CaptionConfig:
    """The CoCa captioning decoder trained beside the contrastive loss (``loss: coca``).

    Shape knobs are :class:`clipforge.caption.decoder.DecoderConfig`'s; the vocabulary is built from the
    training captions before step 0 (:func:`clipforge.caption.vocab.build_vocab`).
    """

    condition: str = _f(
        "auto",
        "what the decoder reads: features (pooled frozen image features; locked tower), embedding (the "
        "image embedding, so caption gradients reach the image head), spatial (cross-attention to the "
        "image tower's spatial tokens, cached when locked), auto: features when locked",
        choices=["auto", "features", "embedding", "spatial"],
    )
    prefix_len: int = _f(4, "learned prefix vectors per image")
    width: int = _f(256, "decoder width")
    layers: int = _f(4, "decoder transformer blocks")
    heads: int = _f(4, "decoder attention heads")
    max_len: int = _f(32, "caption tokens incl. BOS/EOS (longer captions are cut)")
    dropout: float = _f(0.1, "decoder dropout")
    label_smoothing: float = _f(0.1, "label smoothing of the caption cross-entropy")
    vocab_min_count: int = _f(5, "caption vocabulary: words seen at least this often")
    vocab_max_size: int | None = _f(None, "caption vocabulary: at most this many entries")
    lr_scale: float = _f(1.0, "decoder learning rate = lr x this")

    def validate(self) -> None:
        if self.condition not in ("auto", "features", "embedding", "spatial"):
            raise ConfigError(
                f"caption.condition must be auto, features, embedding or spatial, got {self.condition!r}"
            )
        if self.vocab_min_count < 1 or self.lr_scale <= 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("caption: vocab_min_count >= 1, lr_scale > 0, label_smoothing in [0, 1)")
        if self.max_len < 3:
            raise ConfigError("caption.max_len must be >= 3 (BOS, a word, EOS)")


LOSSES = ("clip", "siglip", "coca")


@dataclass
class TrainConfig:
    model: str = _f(
        "scratch:vit-tiny",
        "model spec or saved dir: towers:IMG+TXT, hf:PATH, scratch:NAME, py:MODULE:FUNCTION",
    )
    model_opts: dict[str, Any] = _f({}, "option for load_model, KEY=VALUE (repeat), e.g. unlock_image=1")
    data: list[str] = _f([], "shard specs: paths, globs, brace ranges, dirs, urls")
    output: str = _f("runs/train", "run directory (checkpoints, metrics, final model)")
    # length: exactly one of steps / epochs
    steps: int | None = _f(None, "optimizer steps (or --epochs)")
    epochs: float | None = _f(None, "passes over the data (steps = epochs * samples // batch)")
    batch_size: int = _f(64, "GLOBAL batch size (all ranks and micro-batches)")
    accum: int = _f(1, "GradCache micro-batches per step (the contrastive batch stays batch_size)")
    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.1, "decoupled weight decay (not on norms/biases/scale)")
    warmup: int = _f(0, "linear warmup steps before cosine decay")
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of lr")
    betas: tuple[float, float] = _f((0.9, 0.98), "AdamW betas")
    eps: float = _f(1e-6, "AdamW eps")
    grad_clip: float | None = _f(1.0, "max global grad norm (0 or none = off)")
    loss: str = _f(
        "clip", "contrastive loss; coca: clip + a captioning decoder (see caption.*)", choices=list(LOSSES)
    )
    caption_weight: float = _f(2.0, "coca: loss = contrastive + this x caption cross-entropy (open_clip: 2)")
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    local_loss: bool = _f(True, "each rank scores its rows against all gathered columns")
    multi_positive: int = _f(0, "K > 1: K captions per image in a batch, all positives")
    precision: str = _f("fp32", "autocast precision", choices=["fp32", "bf16"])
    grad_checkpointing: bool = _f(False, "gradient checkpointing, if the model supports it")
    compile: bool = _f(False, "torch.compile the embedding steps")
    fsdp: bool = _f(False, "under torchrun: shard the trainable towers with FSDP2 (heads replicated)")
    device: str = _f("auto", "where to train", choices=["auto", "cpu", "cuda"])
    # data
    workers: int = _f(2, "DataLoader workers per rank")
    shuffle_buffer: int = _f(1000, "streaming shuffle buffer (samples)")
    augment: bool = _f(True, "random-resized-crop for a trained image tower (never for a cached one)")
    caption_field: str = _f(
        "captions",
        "captions (all of KEY.json's, one picked per epoch) | caption",
        choices=["captions", "caption"],
    )
    # text sources (train/textsource.py)
    text_source: str = _f(
        "raw",
        "captions trained on: raw (the shard's) | synthetic (side table) | mix:P (synthetic with probability P "
        "each time seen) | multi (raw + synthetic + rewrites + sentences as multi_positive positives, "
        "default 2) | rewrites:K (raw or one of K rewrites, uniformly)",
    )
    text_tables: list[str] = _f(
        [], "Parquet side tables keyed by sample key: files, globs, dirs (caption run's OUTPUT works)"
    )
    text_column: str = _f(
        "caption_synthetic", "side-table column of the synthetic caption (or caption_fused)"
    )
    rewrites_column: str = _f("caption_rewrites", "side-table column of the rewrites (list of strings)")
    weight_column: str | None = _f(None, "side-table column of per-pair loss weights >= 0 (ALIP-style)")
    text_splits: bool = _f(True, "multi: also the sentences of multi-sentence captions (DreamLIP)")
    # locked-tower feature cache
    cache: str = _f("auto", "cache locked-tower features (auto) or not (off)", choices=["auto", "off"])
    cache_dir: str | None = _f(None, "feature cache root (default: OUTPUT/../.feature_cache)")
    cache_batch_size: int = _f(128, "batch size while building the feature cache")
    # checkpoints / logging
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept")
    resume: bool = _f(False, "continue from OUTPUT's latest checkpoint (its config.yaml must match)")
    log_every: int = _f(1, "metrics row every N steps")
    seed: int = _f(0, "seed of init, shuffling, augmentation and caption choice")
    threads: int | None = _f(None, "torch intra-op threads (default: the CPUs available)")
    tensorboard: bool = _f(True, "write tensorboard events")
    progress: bool = _f(True, "progress bar")

    @classmethod
    def from_any(cls, cfg: TrainConfig | dict | str | Path) -> TrainConfig:
        """An instance passes through; a dict or a YAML file path is loaded strictly."""
        if isinstance(cfg, (str, Path)):
            cfg = load_file(cfg)
        if not isinstance(cfg, (TrainConfig, dict)):
            raise TypeError(f"TrainConfig.from_any: expected TrainConfig, dict or YAML path, got {type(cfg)}")
        return from_dict(cls, cfg, "train config")

    def validate(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.grad_clip is not None and self.grad_clip <= 0:
            self.grad_clip = None
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of steps or epochs")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if isinstance(self.caption, dict):
            self.caption = from_dict(CaptionConfig, self.caption, "train config.caption")
        self.caption.validate()
        if self.loss == "coca" and self.fsdp:
            raise ConfigError("loss=coca does not support fsdp yet (the decoder is not sharded)")
        if self.caption_weight < 0:
            raise ConfigError("caption_weight must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.accum < 1 or self.batch_size < 1:
            raise ConfigError("batch_size and accum must be >= 1")
        if self.cache not in ("auto", "off"):
            raise ConfigError(f"cache must be auto or off, got {self.cache!r}")
        if not self.data:
            raise ConfigError("no training data: give shard specs (data=...)")
        self._validate_text()

    def _validate_text(self) -> None:
        from clipforge.train.textsource import TextSource

        if isinstance(self.text_tables, str):
            self.text_tables = [self.text_tables]
        source = TextSource.parse(self.text_source)
        if (source.mode != "raw" or self.weight_column) and not self.text_tables:
            raise ConfigError(
                f"text_source {self.text_source}"
                + (f" / weight_column {self.weight_column}" if self.weight_column else "")
                + " needs text_tables (Parquet side tables keyed by sample key, e.g. caption run's OUTPUT)"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        write_run_config(path, self)


# What a --resume may change: how long, how it is run and logged. Everything else (model, data,
# batch, optimizer, loss, seed...) must equal the run's config.yaml. The data layer checks on its own
# that the streaming layout (ranks x workers) is the checkpoint's.
RESUME_MAY_CHANGE = (
    "steps",
    "epochs",
    "resume",
    "progress",
    "threads",
    "workers",
    "device",
    "fsdp",
    "accum",
    "compile",
    "grad_checkpointing",
    "output",
    "cache_dir",
    "cache_batch_size",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "tensorboard",
)


TEXT_FIELDS = ("text_source", "text_tables", "text_column", "rewrites_column", "weight_column", "text_splits")


def check_resume_config(path: str | Path, cfg: TrainConfig) -> None:
    """The run at ``path`` (its config.yaml) must have trained what ``cfg`` continues.

    The caption settings matter only to a ``coca`` run: a clip/siglip run written before they existed
    resumes."""
    ignore = list(RESUME_MAY_CHANGE)
    if cfg.loss != "coca":
        ignore += ["caption_weight", "caption", *(f"caption.{k}" for k in to_dict(CaptionConfig()))]
    saved = load_file(path) if Path(path).is_file() else {}
    defaults = to_dict(TrainConfig(data=["x"], steps=1))
    mine = to_dict(cfg)
    ignore += [k for k in TEXT_FIELDS if k not in saved and mine[k] == defaults[k]]  # runs from before them
    check_run_config(path, cfg, ignore=ignore)
