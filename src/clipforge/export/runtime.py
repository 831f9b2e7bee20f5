"""An ``--format onnx`` export dir as a model the encode layer takes (``--runtime onnx`` builds on it).

:class:`OnnxClipModel` has what clipforge.models.encode uses of a model (``encode_image``,
``encode_text``, ``tokenize``, ``preprocess``, ``config``, ``eval``/``train``) and runs the two graphs
in onnxruntime with ``threads`` intra-op threads. Its fingerprint (encode.fingerprint) covers the
bytes of both graphs, so caches never mix it up with the torch model it came from. Inference only:
the graphs emit unit-norm embeddings (``normalize=False`` is refused), and there is nothing to train.

:func:`load_runtime` is the one switch behind ``--runtime torch|onnx`` (serve, index build/search):
with onnx and no export dir it exports the torch model once into a cache dir keyed by its
fingerprint. :func:`model_identity` is what an index / server compares: for an fp32 export it is the
fingerprint of the torch model it came from (same embeddings to 1e-4), so an index built with one
runtime is served by the other without the "different model" warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.export.onnx import (
    CONFIG_FILE,
    IMAGE_FILE,
    PREPROCESS_FILE,
    TEXT_FILE,
    graph_inputs,
    graph_paths,
    int8_sides,
    sessions,
)

log = logging.getLogger("clipforge.export")
RUNTIMES = ("torch", "onnx")


def int8_label(int8: bool | str) -> str:
    """``none`` | ``text`` | ``image`` | ``all``: which graphs were asked for as int8."""
    image, text = int8_sides(int8)
    return {(False, False): "none", (False, True): "text", (True, False): "image"}.get((image, text), "all")


class OnnxClipModel(nn.Module):
    """The image and text graphs of an ONNX export behind clipforge's encode interface (CPU)."""

    def __init__(
        self, directory: str | Path, threads: int | None = None, int8: bool | str = False, spin: bool = False
    ) -> None:
        super().__init__()
        from clipforge.data.transforms import ImageTransform, PreprocessConfig
        from clipforge.models.tokenizer import Tokenizer
        from clipforge.models.types import ModelConfig

        d = Path(directory)
        missing = [f for f in (IMAGE_FILE, TEXT_FILE, CONFIG_FILE, PREPROCESS_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{d} is not an onnx export (missing {', '.join(missing)})")
        meta = json.loads((d / CONFIG_FILE).read_text())
        pre = json.loads((d / PREPROCESS_FILE).read_text())
        self.directory = d
        # int8 graphs give other embeddings: they keep their own identity (the graph digest)
        quantized = any(f.name.endswith(".int8.onnx") for f in graph_paths(d, int8))
        self.source_fingerprint: str | None = None if quantized else meta.get("source_fingerprint")
        self.image_session, self.text_session = sessions(d, threads, int8=int8, spin=spin)
        self.text_inputs = graph_inputs(self.text_session)  # a model that ignores the mask has no such input
        self.tokenizer = Tokenizer.from_dir(d)
        self.config = ModelConfig(
            backend="onnx",
            spec=f"onnx:{d}",
            embed_dim=int(meta["embed_dim"]),
            init_logit_scale=math.log(float(meta["logit_scale"])),
            init_logit_bias=meta.get("logit_bias"),
            preprocess=pre,
            context_length=int(meta["context_length"]),
            options={"source_spec": meta.get("spec"), "opset": meta.get("opset"), "int8": int8_label(int8)},
        )
        self.preprocess = ImageTransform(PreprocessConfig.from_dict(pre), train=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.init_logit_scale), requires_grad=False)
        bias = meta.get("logit_bias")
        self.logit_bias = (
            None if bias is None else nn.Parameter(torch.tensor(float(bias)), requires_grad=False)
        )
        digest = hashlib.sha256()
        for f in graph_paths(d, int8):  # the graphs actually loaded (fp32 or int8)
            digest.update(f.read_bytes())
        self.register_buffer("graph_digest", torch.tensor(list(digest.digest()), dtype=torch.uint8))
        self.eval()

    @staticmethod
    def _check(normalize: bool) -> None:
        if not normalize:
            raise ValueError("the onnx graphs emit unit-norm embeddings (normalize=False is not available)")

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._check(normalize)
        x = np.ascontiguousarray(pixels.detach().float().cpu().numpy())
        return torch.from_numpy(self.image_session.run(None, {"pixels": x})[0])

    def encode_text(
        self, tokens: dict[str, torch.Tensor] | torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        self._check(normalize)
        if isinstance(tokens, torch.Tensor):
            tokens = {"input_ids": tokens, "attention_mask": (tokens != self.pad_token_id).long()}
        feed = {
            k: np.ascontiguousarray(tokens[k].detach().cpu().numpy().astype(np.int64))
            for k in ("input_ids", "attention_mask")
            if k in self.text_inputs
        }
        return torch.from_numpy(self.text_session.run(None, feed)[0])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # the feature/head split of ClipModel: nothing is cached for an inference-only graph
    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": pixels}

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_image(feats["pixels"])

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tokens)

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode_text(feats)

    image_locked = text_locked = False

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        return (
            self.encode_image(pixels),
            self.encode_text(tokens),
            self.logit_scale.exp().clamp(max=100.0),
            self.logit_bias,
        )

    def describe(self) -> dict[str, Any]:
        o = self.config.options
        return {"spec": self.config.spec, "params": 0, "trainable": 0, "embed_dim": self.config.embed_dim,
                "runtime": "onnx", "source_spec": o.get("source_spec"), "int8": o.get("int8", "none")}  # fmt: skip


def model_identity(model: nn.Module) -> str:
    """The fingerprint an index or server compares: the source torch model's for an fp32 onnx export."""
    from clipforge.models.encode import fingerprint

    return getattr(model, "source_fingerprint", None) or fingerprint(model)


def is_onnx_export(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / IMAGE_FILE).is_file()


def onnx_cache_dir() -> Path:
    """Where ``--runtime onnx`` keeps the exports it makes: ``$CLIPFORGE_CACHE/onnx`` (as zeroshot/)."""
    return Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "onnx"


def cached_export(model: nn.Module, cache: str | Path | None = None) -> Path:
    """The onnx export of ``model`` under ``cache/FINGERPRINT``, written once (atomic rename: two
    processes exporting at once both succeed and one export is kept)."""
    from clipforge.export.api import export_model
    from clipforge.models.encode import fingerprint

    fp = fingerprint(model)
    root = Path(cache) if cache is not None else onnx_cache_dir()
    final = root / fp
    if (
        is_onnx_export(final)
        and json.loads((final / CONFIG_FILE).read_text()).get("source_fingerprint") == fp
    ):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.", suffix=".tmp", dir=root))
    try:
        log.info("exporting %s to onnx once (cache %s)", model.config.spec, final)
        export_model(model, "onnx", tmp / "export")
        if final.exists() and not is_onnx_export(final):
            shutil.rmtree(final, ignore_errors=True)  # a broken leftover: replaced
        try:
            os.rename(tmp / "export", final)
        except OSError:
            if not is_onnx_export(final):  # not a concurrent writer's complete export: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_runtime(
    model: str | Path | nn.Module,
    runtime: str = "torch",
    threads: int | None = None,
    onnx_dir: str | Path | None = None,
    *,
    allow_code: bool = False,
    cache: str | Path | None = None,
) -> nn.Module:
    """``--runtime torch|onnx``: the torch model (eval) or an :class:`OnnxClipModel` of it.

    ``model``: a spec, a saved model dir, a loaded model, or (onnx only) an onnx export dir.
    With onnx: ``onnx_dir`` if given, else the model's cached export (made on first use).
    ``threads``: onnxruntime intra-op threads; None: as many as torch has (``setup_torch_threads``:
    ``--threads``, ``CLIPFORGE_THREADS`` or the CPUs really available, cgroup quota included).
    """
    threads = threads or torch.get_num_threads()
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if isinstance(model, OnnxClipModel):
        if runtime != "onnx":
            raise ValueError("an onnx export runs with --runtime onnx, not torch")
        return model
    if not isinstance(model, nn.Module) and is_onnx_export(model):
        if runtime != "onnx":
            raise ValueError(f"{model} is an onnx export: serve it with --runtime onnx")
        return OnnxClipModel(model, threads)
    if runtime == "onnx" and onnx_dir is not None:
        return OnnxClipModel(onnx_dir, threads)
    if isinstance(model, nn.Module):
        torch_model = model.eval()
    else:
        from clipforge.models import load_model

        torch_model = load_model(str(model), allow_code=allow_code).eval()
    if runtime == "torch":
        return torch_model
    return OnnxClipModel(cached_export(torch_model, cache), threads)
