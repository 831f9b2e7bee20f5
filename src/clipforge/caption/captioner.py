"""A saved captioner: decoder + vocabulary + which encoder (and condition) it reads, in one directory.

    DIR/config.json        decoder shape, mode, encoder spec + fingerprint, condition kind, DeCap setting
    DIR/model.safetensors  decoder weights
    DIR/vocab.json         the caption vocabulary (tokenizers JSON)
    DIR/memory.safetensors text-only captioners: training text embeddings for DeCap's projection
    DIR/consensus.safetensors training vectors + captions for rerank=consensus (images: paired; texts: text-only)

The encoder's fingerprint (``models/encode.fingerprint``; frozen weights only for ``features``) is
checked when the encoder is loaded back, so a captioner is never fed vectors from another model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipforge.caption.decoder import CaptionDecoder, load_decoder, save_decoder
from clipforge.caption.decoding import DecodeOptions, SpecialIds, generate_candidates
from clipforge.caption.rerank import FILE as CONSENSUS_FILE
from clipforge.caption.rerank import ConsensusMemory, rerank
from clipforge.caption.vocab import CaptionVocab
from clipforge.config import ConfigError


def encoder_fingerprint(model: Any, kind: str) -> str:
    from clipforge.models.encode import fingerprint

    return fingerprint(model, frozen_only=kind in ("features", "spatial"))


class Captioner:
    """Decoder + vocabulary + the encoder settings; ``caption(cond)`` -> strings."""

    def __init__(
        self,
        decoder: CaptionDecoder,
        vocab: CaptionVocab,
        meta: dict[str, Any],
        memory: torch.Tensor | None = None,
    ) -> None:
        self.decoder, self.vocab, self.meta, self.memory = decoder, vocab, meta, memory
        self.consensus: ConsensusMemory | None = None  # training vectors + captions for rerank=consensus
        self.directory: Path | None = None  # where it was loaded from

    @property
    def ids(self) -> SpecialIds:
        v = self.vocab
        return SpecialIds(bos=v.bos_id, eos=v.eos_id, pad=v.pad_id, unk=v.unk_id)

    @property
    def condition(self) -> str:
        return self.meta["encoder"]["condition"]

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "paired")

    def save(self, directory: str | Path) -> Path:
        files = {"vocab.json": self.vocab.save}
        if self.memory is not None:
            files["memory.safetensors"] = lambda p: save_file({"memory": self.memory.contiguous()}, str(p))
        if self.consensus is not None:
            files[CONSENSUS_FILE] = self.consensus.save
        return save_decoder(directory, self.decoder, self.meta, files)

    @classmethod
    def load(cls, directory: str | Path) -> Captioner:
        from clipforge.caption.openclip_coca import is_coca_spec, load_captioner

        if is_coca_spec(directory):  # an open_clip CoCa (openclip:DIR, or a saved dir of one) captions itself
            return load_captioner(directory)
        directory = Path(directory)
        decoder, meta = load_decoder(directory)
        if "encoder" not in meta:
            raise ValueError(f"{directory}/config.json has no encoder section: not a captioner dir")
        vocab = CaptionVocab.load(directory / "vocab.json")
        mem_path = directory / "memory.safetensors"
        memory = load_file(str(mem_path))["memory"] if mem_path.is_file() else None
        out = cls(decoder, vocab, meta, memory)
        if (directory / CONSENSUS_FILE).is_file():
            out.consensus = ConsensusMemory.load(directory / CONSENSUS_FILE)
        out.directory = directory
        return out

    def load_encoder(self, spec: str | None = None) -> Any:
        """The CLIP model whose vectors this captioner reads, checked by fingerprint.

        ``spec``: the user's own spec for it (needed for ``py:`` specs, which are never run because a
        file names them); by default the spec saved in config.json.
        """
        from clipforge.models import load_model

        enc = self.meta["encoder"]
        opts = enc.get("model_opts") or {}
        if spec:
            model = load_model(spec, allow_code=True, **opts)
        elif str(enc["model"]).startswith("py:"):
            raise ValueError(
                f"the captioner's encoder {enc['model']!r} runs code: a spec read from a file is never "
                "run; pass it yourself with --encoder"
            )
        elif enc.get("in_model_dir") and self.directory is not None:
            # a CoCa captioner lives in MODEL_DIR/captioner: its encoder is the parent dir, wherever
            # that dir was moved to (the absolute path recorded at training time may be stale)
            model = load_model(self.directory.resolve().parent)
        else:
            model = load_model(enc["model"], **opts)
        got = encoder_fingerprint(model, enc["condition"])
        if enc.get("fingerprint") and got != enc["fingerprint"]:
            raise ValueError(
                f"encoder {enc['model']} has fingerprint {got}, but the captioner was trained on "
                f"{enc['fingerprint']}: its weights changed, the captions would be meaningless"
            )
        return model

    def project(self, cond: torch.Tensor, temperature: float | None) -> torch.Tensor:
        """DeCap: replace an image embedding by the softmax(sim / T)-weighted mix of training text
        embeddings (lands it in the text distribution the decoder learned). ``None``/0: unchanged."""
        if not temperature or self.memory is None:
            return cond
        cond = F.normalize(cond.float(), dim=-1)
        mem = self.memory.float()
        out = []
        for s in range(0, cond.shape[0], 256):
            w = (cond[s : s + 256] @ mem.T / temperature).softmax(-1)
            out.append(F.normalize(w @ mem, dim=-1))
        return torch.cat(out)

    def candidates(
        self, cond: torch.Tensor, opts: DecodeOptions, decap_temperature: float | None = None
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Condition vectors [N, C] (image tokens [N, T, C] for ``spatial``) -> ``opts.num_candidates``
        captions per row (best first), scores."""
        if self.mode == "text-only":
            t = self.meta.get("decap_temperature") if decap_temperature is None else decap_temperature
            cond = self.project(cond, t)
            cond = F.normalize(cond.float(), dim=-1)
        cond = cond if cond.ndim == 3 else cond.float()  # image tokens stay fp16: the decoder casts per chunk
        if opts.rerank == "consensus":
            return self._reranked(cond, opts)
        seqs, scores = generate_candidates(self.decoder, cond, opts, self.ids)
        return [[self.vocab.decode(s) for s in row] for row in seqs], scores

    def _reranked(self, cond: torch.Tensor, opts: DecodeOptions) -> tuple[list[list[str]], list[list[float]]]:
        """The whole beam, reordered by decoder score + weight x consensus of the nearest training images."""
        if self.consensus is None:
            raise ConfigError(
                "rerank=consensus needs the captioner's consensus memory (consensus.safetensors, written by "
                "`caption train`); this captioner has none"
            )
        opts.validate()
        beam = DecodeOptions(**{**opts.__dict__, "num_candidates": opts.beam_width, "rerank": "none"})
        seqs, scores = generate_candidates(self.decoder, cond, beam, self.ids)
        texts = [[self.vocab.decode(s) for s in row] for row in seqs]
        votes = self.consensus.consensus(cond, texts, opts.rerank_k)
        return rerank(texts, scores, votes, opts.rerank_weight, opts.num_candidates)

    def caption(
        self, cond: torch.Tensor, opts: DecodeOptions, decap_temperature: float | None = None
    ) -> tuple[list[str], list[float]]:
        """Condition vectors [N, C] -> (captions, decoder scores): one caption per row."""
        opts = DecodeOptions(**{**opts.__dict__, "num_candidates": 1})
        texts, scores = self.candidates(cond, opts, decap_temperature)
        return [t[0] for t in texts], [s[0] for s in scores]

    def caption_images(
        self, encoder: Any, images: list[Any], opts: DecodeOptions, decap_temperature: float | None = None
    ) -> list[str]:
        """PIL images -> captions (what ``POST /caption`` needs): encoder from :meth:`load_encoder`."""
        if not images:
            return []
        return self.caption(self.image_conditions(encoder, images), opts, decap_temperature)[0]

    def image_conditions(self, encoder: Any, images: list[Any]) -> torch.Tensor:
        """What the decoder reads for PIL images: vectors [N, C] or, for ``spatial``, tokens [N, T, C]."""
        if self.condition == "spatial":
            from clipforge.caption.spatial import image_spatial_conditions

            return image_spatial_conditions(encoder, images)
        from clipforge.caption.features import image_conditions

        return image_conditions(encoder, images, self.condition)

    def shard_conditions(self, encoder: Any, shards: str | list[str], **kw: Any) -> Any:
        """:func:`clipforge.caption.features.shard_conditions` for this captioner's condition kind
        (``spatial``: float16 image tokens, :func:`clipforge.caption.spatial.shard_spatial_conditions`)."""
        if self.condition == "spatial":
            from clipforge.caption.spatial import shard_spatial_conditions

            return shard_spatial_conditions(encoder, shards, **kw)
        from clipforge.caption.features import shard_conditions

        return shard_conditions(encoder, shards, self.condition, **kw)
