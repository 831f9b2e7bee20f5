"""CoCa in the trainer (``loss: coca``): a captioning decoder trained on the same batches as the
contrastive loss, ``loss = contrastive + caption_weight * caption cross-entropy`` (open_clip: 2.0).

The decoder is caption/decoder.py's prefix decoder (one implementation), conditioned on

- ``features``: the pooled frozen image features (a locked tower; read from the feature cache, so a
  step costs only the heads and the decoder). The contrastive side is then untouched: the decoder's
  init runs under its own seed, its gradients are clipped apart, so the heads train exactly as in a
  plain ``clip`` run;
- ``embedding``: the image embedding itself, so the caption loss also trains the image side (CoCa's
  shared encoder; the only choice when the image tower trains);
- ``spatial``: CoCa's cross-attention decoder over the locked image tower's spatial tokens
  (EfficientNet-Lite0's 7x7x1280 last stage, ViT patch tokens; caption/spatial.py). With the feature
  cache they are cached once too (float16, :func:`~clipforge.caption.spatial.load_or_build_spatial_cache`)
  and ride in the cached image features as ``SPATIAL_KEY`` (so batches, GradCache splits and device
  moves carry them unchanged); without it they are computed from the batch's pixels.

During training the decoder is a submodule of the model (``model.caption_decoder``): the optimizer,
checkpoints (exact resume), gradient averaging and device moves need nothing new. At the end it is
detached and saved as a :class:`~clipforge.caption.captioner.Captioner` in ``MODEL_DIR/captioner``,
so ``load_model(MODEL_DIR)`` embeds as before and ``model.caption(images)`` captions.
The vocabulary is built from the training captions before step 0 and kept in ``OUTPUT/caption_vocab.json``
(a resumed run reads it back instead of rebuilding).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from clipforge.caption.captioner import Captioner, encoder_fingerprint
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
from clipforge.caption.features import pool_features
from clipforge.caption.train import caption_loss, make_pairs, pad_tokens
from clipforge.caption.vocab import CaptionVocab, build_vocab
from clipforge.config import ConfigError
from clipforge.models.base import ClipModel, Features

log = logging.getLogger(__name__)

ATTR = "caption_decoder"  # the decoder's submodule name while training
SPATIAL_KEY = "coca_spatial"  # the spatial tokens' entry in the cached image features
VOCAB_FILE = "caption_vocab.json"
CAPTIONER_DIR = "captioner"  # inside a saved model dir


def resolve_condition(condition: str, model: ClipModel) -> str:
    """auto -> features for a locked image tower, else embedding; features needs a locked tower."""
    if condition == "auto":
        return "features" if model.image_locked else "embedding"
    if condition == "features" and not model.image_locked:
        raise ConfigError(
            "caption.condition=features needs a locked image tower (its features would change while "
            "training); use caption.condition=embedding"
        )
    if condition == "spatial":
        from clipforge.caption.spatial import check_spatial

        check_spatial(model)
    return condition


def shard_captions(urls: list[str], all_captions: bool) -> list[str]:
    """Every training caption of ``urls`` (a text-only pass: no image is decoded)."""
    from clipforge.data.dataset import ShardDataset
    from clipforge.data.decode import DecodeConfig
    from clipforge.data.report import BadSampleReport

    ds = ShardDataset(
        urls, decode=DecodeConfig(image=False, caption=True), epochs=1, rank=0, world_size=1,
        report=BadSampleReport(),
    )  # fmt: skip
    out: list[str] = []
    for s in ds:
        out += list(s["captions"]) if all_captions else [s["caption"]]
    return out


def load_or_build_vocab(out: Path, captions: Any, cfg: Any, resume: bool, main: bool) -> CaptionVocab:
    """The run's vocabulary: read back on resume, else built from ``captions()`` (rank 0 writes it)."""
    path = out / VOCAB_FILE
    if resume and path.is_file():
        return CaptionVocab.load(path)
    vocab = build_vocab(captions(), min_count=cfg.vocab_min_count, max_size=cfg.vocab_max_size)
    if len(vocab) <= 4:
        raise ConfigError(
            f"caption vocabulary is empty: no word is seen {cfg.vocab_min_count}+ times in the training "
            "captions (lower caption.vocab_min_count)"
        )
    if main:
        vocab.save(path)
    log.info("caption vocabulary: %d entries (words seen >= %d times)", len(vocab), cfg.vocab_min_count)
    return vocab


def condition_dim(model: ClipModel, condition: str, cached_image: Features | None) -> int:
    """Width of the condition vector: the embedding size, or the pooled frozen features' width."""
    if condition == "embedding":
        return int(model.config.embed_dim)
    if cached_image is not None:
        return int(pool_features({k: v[:1] for k, v in cached_image.items()}).shape[-1])
    from clipforge.data.transforms import PreprocessConfig

    size = PreprocessConfig.from_dict(model.config.preprocess).size
    dev = next(model.parameters()).device
    with torch.no_grad():
        feats = model.image_features(torch.zeros(1, 3, size, size, device=dev))
    return int(pool_features(feats).shape[-1])


def build_decoder(
    cfg: Any, vocab_size: int, cond_dim: int, seed: int, cross_tokens: int | None = None
) -> CaptionDecoder:
    """The decoder, initialised from its own seed: the global RNG (dropout, data) is left as it was.

    ``cross_tokens`` (image tokens per image): a cross-attention decoder over ``cond_dim``-wide tokens."""
    cross = cross_tokens is not None
    dcfg = DecoderConfig(
        vocab_size=vocab_size, cond_dim=cond_dim, prefix_len=cfg.prefix_len, width=cfg.width,
        layers=cfg.layers, heads=cfg.heads, max_len=cfg.max_len, dropout=cfg.dropout,
        cross_dim=cond_dim if cross else 0, cross_tokens=cross_tokens or 0,
    )  # fmt: skip
    dcfg.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 7919 + 17)
        return CaptionDecoder(dcfg)


def attach_spatial_cache(trainer: Any) -> int:
    """Spatial tokens of every cached sample, into the cached image features as ``SPATIAL_KEY``
    (rank 0 builds the token cache, the others read its files); returns tokens per image."""
    from clipforge.caption.spatial import align, load_or_build_spatial_cache
    from clipforge.train.dist import barrier

    cfg, data = trainer.cfg, trainer.source.data
    root = Path(cfg.cache_dir) if cfg.cache_dir else trainer.out.parent / ".feature_cache"
    kw = dict(batch_size=cfg.cache_batch_size, workers=cfg.workers, progress=trainer.show)
    if trainer.dist.main:
        keys, tokens, path = load_or_build_spatial_cache(trainer.model, trainer.urls, root, **kw)
    barrier(trainer.world)
    if not trainer.dist.main:
        keys, tokens, path = load_or_build_spatial_cache(trainer.model, trainer.urls, root, **kw)
    data.image[SPATIAL_KEY] = align(list(data.keys), keys, tokens)
    trainer.spatial_cache_dir = path
    log.info("coca: spatial tokens %s of %d images from %s", tuple(tokens.shape[1:]), len(data), path)
    return int(tokens.shape[1])


def decoder_for(trainer: Any, condition: str, vocab_size: int) -> CaptionDecoder:
    """The run's decoder for ``condition`` (what ``Trainer._setup_coca`` builds): a prefix decoder on
    the embedding or pooled features, or, for ``spatial``, a cross-attention decoder whose tokens are
    cached with the features (a locked tower and the cache on) or computed per batch."""
    cfg, model = trainer.cfg, trainer.model
    if condition != "spatial":
        cached = trainer.source.data.image if trainer.cached else None
        return build_decoder(cfg.caption, vocab_size, condition_dim(model, condition, cached), cfg.seed)
    from clipforge.caption.spatial import token_shape

    n_tokens, dim = token_shape(model)
    if trainer.cached:
        n_tokens = attach_spatial_cache(trainer)
    return build_decoder(cfg.caption, vocab_size, dim, cfg.seed, cross_tokens=n_tokens)


def decoder_of(model: ClipModel) -> CaptionDecoder | None:
    return getattr(model, ATTR, None)


class CocaHead:
    """The run's captioning side: vocabulary, condition kind, the caption loss of a batch (part)."""

    def __init__(self, vocab: CaptionVocab, condition: str, cfg: Any, weight: float) -> None:
        self.vocab, self.condition, self.cfg, self.weight = vocab, condition, cfg, weight

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """[B, L] BOS .. EOS ids, cut at the decoder's max_len, PAD-padded."""
        rows = make_pairs([[c] for c in captions], self.vocab, self.cfg.max_len).tokens
        return pad_tokens(rows, self.vocab.pad_id)

    def condition_of(
        self, model: ClipModel, feats: Features, cached: bool, img_emb: torch.Tensor
    ) -> torch.Tensor:
        if self.condition == "embedding":
            return img_emb
        if self.condition == "spatial":
            if cached:
                return feats[SPATIAL_KEY]
            from clipforge.caption.spatial import spatial_tokens

            return spatial_tokens(model, feats["pixels"])
        if not cached:
            with torch.no_grad():
                feats = model.image_features(feats["pixels"])
        return pool_features(feats)

    def loss(
        self, model: ClipModel, feats: Features, cached: bool, img_emb: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """Mean (label-smoothed) next-word cross-entropy over the non-PAD tokens of ``tokens``."""
        cond = self.condition_of(model, feats, cached, img_emb)
        return caption_loss(
            decoder_of(model), cond.float(), tokens, self.vocab.pad_id, self.cfg.label_smoothing
        )

    def n_targets(self, tokens: torch.Tensor) -> int:
        return int((tokens[:, 1:] != self.vocab.pad_id).sum())

    def captioner(
        self, model: ClipModel, decoder: CaptionDecoder, run: dict[str, Any], model_dir: str | Path
    ) -> Captioner:
        """A :class:`Captioner` whose encoder is the model dir it is saved in (``MODEL_DIR/captioner``):
        ``model`` names that dir (absolute, for ``caption run/eval`` as they are); ``in_model_dir`` says
        the encoder is the captioner dir's parent, wherever the pair is moved."""
        meta = {
            "mode": "paired",
            "coca": True,
            "encoder": {
                "model": str(Path(model_dir).resolve()),
                "in_model_dir": True,
                "model_opts": {},
                "condition": self.condition,
                "fingerprint": encoder_fingerprint(model, self.condition),
            },
            "decap_temperature": None,
            "train": run,
        }
        return Captioner(decoder.eval(), self.vocab, meta)


def detach_decoder(model: ClipModel) -> CaptionDecoder | None:
    """Remove the decoder submodule (the model's own weights, fingerprint and save are a plain CLIP's)."""
    dec = decoder_of(model)
    if dec is not None:
        delattr(model, ATTR)
    return dec


def save_captioner(captioner: Captioner, model_dir: str | Path) -> Path:
    return captioner.save(Path(model_dir) / CAPTIONER_DIR)
