"""``ServeConfig``: the server's limits and switches, following :mod:`clipforge.config`.

Every field has a ``clipforge serve`` flag generated from it (serve/cli.py), so a default lives only
here; ``ServeConfig.from_dict`` rejects unknown keys with a did-you-mean. The limits are what keeps one
client from holding the model thread or the image threads: see SECURITY.md ("HTTP surface").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge import config as C
from clipforge.config import opt as _f

PRECISIONS = ("fp32", "bf16", "auto")
RUNTIMES = ("torch", "onnx")  # clipforge.export.runtime.RUNTIMES (kept here: this module stays light)




@dataclass
class ServeConfig:
    """Limits and switches of ``clipforge serve``; every field has a matching flag."""

    batching: bool = _f(True, "share model calls between concurrent requests (micro-batching)")
    max_batch: int = _f(32, "largest micro-batch")
    max_image_batch: int | None = _f(None, "largest image micro-batch (None: 1 on CPU, max_batch on GPU)")
    max_wait_ms: float = _f(5.0, "longest a request waits for a batch to fill")
    max_upload_bytes: int = _f(10 << 20, "request body limit in bytes, chunked bodies included")
    max_image_pixels: int = _f(40_000_000, "decode limit (width*height), checked before decoding")
    max_texts: int = _f(64, "texts per /embed/text request")
    max_text_chars: int = _f(1000, "characters per text, query or label")
    max_k: int = _f(100, "largest k for /search (and top_k for /classify)")
    max_labels: int = _f(1000, "labels per /classify request")
    max_templates: int = _f(16, "prompt templates per /classify request")
    max_template_chars: int = _f(200, "characters per prompt template")
    max_prompts: int = _f(4096, "labels x templates per /classify request (prompts encoded)")
    max_filter_values: int = _f(1000, "values per /search filter column")
    api_key: str | None = _f(None, "require X-API-Key or Bearer (env CLIPFORGE_API_KEY)")
    cors_origins: list[str] = _f([], "allowed CORS origin (repeatable, or *)")
    allow_image_urls: bool = _f(False, "let clients send image URLs for the server to fetch")
    allow_private_urls: bool = _f(False, "with image URLs: also fetch loopback/private/link-local hosts")
    url_timeout_s: float = _f(10.0, "wall-clock deadline of one image URL fetch, redirects included")
    label_sets: dict[str, str] = _f({}, "extra label set NAME=FILE, one label a line (repeatable)")
    decode_threads: int = _f(2, "threads decoding uploaded images")
    fetch_threads: int = _f(4, "threads fetching image URLs (apart from decoding)")
    captioner: str | None = _f(
        None, "captioner dir (clipforge caption train) for POST /caption; trained on this model's vectors"
    )
    max_caption_beams: int = _f(8, "largest beam width a /caption request may ask for")
    max_caption_length: int = _f(40, "largest max_length (tokens) a /caption request may ask for")
    max_captions: int = _f(5, "captions per /caption request (num_captions > 1 needs strategy=sample)")
    precision: str = _f(
        "fp32",
        "fp32 | bf16 | auto (bf16 autocast where native: ~3x for text on AVX512-BF16/AMX)",
        choices=PRECISIONS,
    )
    runtime: str = _f(
        "torch",
        "torch | onnx (the exported graphs in onnxruntime, --threads intra-op threads; ~2x on CPU images)",
        choices=RUNTIMES,
    )
    onnx_dir: str | None = _f(
        None, "with --runtime onnx: an export dir (default: MODEL exported once into $CLIPFORGE_CACHE/onnx)"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise C.ConfigError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise C.ConfigError(f"runtime must be torch or onnx, got {self.runtime!r}")
        if self.runtime == "onnx" and self.precision == "bf16":
            raise C.ConfigError("precision bf16 needs --runtime torch (the onnx graphs run in fp32)")
        if self.runtime == "onnx" and self.captioner is not None:
            raise C.ConfigError("a captioner needs the torch model's features: serve it with --runtime torch")
        if self.onnx_dir is not None and self.runtime != "onnx":
            raise C.ConfigError("onnx_dir applies to --runtime onnx only")
        positive = ("max_batch", "max_upload_bytes", "max_image_pixels", "max_texts", "max_text_chars")
        positive += (
            "max_k",
            "max_labels",
            "max_templates",
            "max_template_chars",
            "max_prompts",
            "max_filter_values",
        )
        positive += (
            "decode_threads",
            "fetch_threads",
            "max_caption_beams",
            "max_caption_length",
            "max_captions",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise C.ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_image_batch is not None and self.max_image_batch < 1:
            raise C.ConfigError(f"max_image_batch must be >= 1 or None, got {self.max_image_batch}")
        if self.max_wait_ms < 0 or not self.url_timeout_s > 0:
            raise C.ConfigError("max_wait_ms must be >= 0 and url_timeout_s > 0")
        self.label_sets = {str(k): str(v) for k, v in self.label_sets.items()}
        for name, path in self.label_sets.items():
            if not name or not Path(path).is_file():
                raise C.ConfigError(f"label set needs NAME=FILE with an existing file, got {name}={path}")

        if self.captioner is not None and not Path(self.captioner).is_dir():
            raise C.ConfigError(
                f"captioner must be a directory from `clipforge caption train`: {self.captioner}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | ServeConfig | None) -> ServeConfig:
        """Strict: an unknown key raises ConfigError naming the closest field."""
        return C.from_dict(cls, d)
