"""``--format onnx``: the image and text towers as two ONNX graphs, for onnxruntime in production.

    image.onnx  pixels [batch, 3, S, S] float32                   -> image_embeds [batch, D] (unit norm)
    text.onnx   input_ids, attention_mask [batch, seq] int64      -> text_embeds  [batch, D] (unit norm)

Beside them: the tokenizer (tokenizer.json + tokenizer_meta.json: pad id, context length), the
preprocessing (preprocess.json: size, mean/std, resize mode, interpolation) and onnx_config.json
(opset, input/output names and dynamic axes, logit scale/bias, the check against torch).
Exported with torch's TorchScript-based exporter (seconds; the dynamo one takes ~10x longer on these
graphs and needs onnxscript); after export both graphs are run in onnxruntime on a small batch and
the largest difference to torch is recorded (tests hold it under 1e-4).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OPSET = 17
QUANTIZE = ("none", "text", "all")  # int8 dynamic quantization: of no graph, the text graph, both
IMAGE_FILE, TEXT_FILE, CONFIG_FILE, PREPROCESS_FILE = (
    "image.onnx",
    "text.onnx",
    "onnx_config.json",
    "preprocess.json",
)
PROBE_TEXTS = ["a photo of a dog", "two children playing football on a sunny beach near the sea", "x"]


def supports(model: nn.Module) -> str | None:
    """Every clipforge model exports (the graphs trace ``encode_image`` / ``encode_text``)."""
    if getattr(model, "tokenizer", None) is None:
        return "the model has no tokenizer to ship beside the text graph"
    return None


class ImageGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class TextGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(
            {"input_ids": input_ids, "attention_mask": attention_mask}, normalize=True
        )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise RuntimeError("--format onnx needs the onnx package: pip install 'clipforge[onnx]'") from e


def probe_inputs(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A fixed pixel batch and tokenized texts, for tracing and for the parity check."""
    size = int(model.config.preprocess["size"])
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    return pixels, model.tokenize(PROBE_TEXTS[:batch] if batch <= len(PROBE_TEXTS) else PROBE_TEXTS)


def int8_name(file: str) -> str:
    return file.replace(".onnx", ".int8.onnx")


def quantize(out: Path, which: str) -> list[str]:
    """int8 dynamic quantization (weights int8, activations quantized on the fly) beside the fp32 graphs."""
    if which not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {which!r}")
    if which == "none":
        return []
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    files = [TEXT_FILE] if which == "text" else [TEXT_FILE, IMAGE_FILE]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint per graph on the root logger
    try:
        for f in files:
            pre = out / f"{f}.pre.tmp"
            # shape inference + constant folding first: the fused-BN convs of the towers model carry
            # weights as Constant nodes, which the quantizer refuses ("expected an initializer")
            try:
                quant_pre_process(str(out / f), str(pre), skip_symbolic_shape=True)
                src = pre
            except Exception:  # pre-processing is an optimisation: quantize the graph as exported
                src = out / f
            try:
                quantize_dynamic(str(src), str(out / int8_name(f)), weight_type=QuantType.QInt8)
            finally:
                pre.unlink(missing_ok=True)
    finally:
        root.setLevel(level)
    return [int8_name(f) for f in files]


def export(
    model: nn.Module, out: Path, opset: int = DEFAULT_OPSET, verify: bool = True, quantize_int8: str = "none"
) -> dict[str, Any]:
    """``quantize_int8``: also write int8 copies of the text graph (``text``) or of both (``all``)."""
    _require_onnx()
    from clipforge.export.tokenizer_files import save_hf_tokenizer

    model.eval()
    pixels, tokens = probe_inputs(model, 2)
    with torch.no_grad():
        model.encode_image(pixels)  # builds lazily created modules (fused BN prefix) before tracing
        model.encode_text(tokens)
    axes_img = {"pixels": {0: "batch"}, "image_embeds": {0: "batch"}}
    axes_txt = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "text_embeds": {0: "batch"},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ImageGraph(model).eval(),
            (pixels,),
            str(out / IMAGE_FILE),
            input_names=["pixels"],
            output_names=["image_embeds"],
            dynamic_axes=axes_img,
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            TextGraph(model).eval(),
            (tokens["input_ids"], tokens["attention_mask"]),
            str(out / TEXT_FILE),
            input_names=["input_ids", "attention_mask"],
            output_names=["text_embeds"],
            dynamic_axes=axes_txt,
            opset_version=opset,
            dynamo=False,
        )
    files = [IMAGE_FILE, TEXT_FILE, PREPROCESS_FILE, CONFIG_FILE, *save_hf_tokenizer(model, out)]
    (out / PREPROCESS_FILE).write_text(json.dumps(model.config.preprocess, indent=2))
    cfg = {
        "opset": opset,
        "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
        "image": {
            "file": IMAGE_FILE,
            "inputs": {"pixels": ["batch", 3, pixels.shape[-2], pixels.shape[-1]]},
            "outputs": {"image_embeds": ["batch", int(model.config.embed_dim)]},
        },
        "text": {
            "file": TEXT_FILE,
            "inputs": {k: ["batch", "seq"] for k in onnx_input_names(out / TEXT_FILE)},
            "outputs": {"text_embeds": ["batch", int(model.config.embed_dim)]},
        },
        "normalized": True,
        "embed_dim": int(model.config.embed_dim),
        "context_length": int(model.config.context_length),
        "pad_token_id": int(model.pad_token_id),
        "logit_scale": float(model.logit_scale.detach().exp().clamp(max=100.0)),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "spec": model.config.spec,
        # the torch model's identity (models.encode.fingerprint): --runtime onnx counts as the same model
        "source_fingerprint": _source_fingerprint(model),
    }
    if verify:
        cfg["max_abs_diff_vs_torch"] = check_parity(model, out)
    int8 = quantize(out, quantize_int8)
    if int8:
        cfg["int8"] = {
            "files": int8,
            "kind": "dynamic (onnxruntime.quantization.quantize_dynamic, QInt8 weights)",
        }
        if verify:
            cfg["int8"]["max_abs_diff_vs_torch"] = check_parity(model, out, int8=True)
    files += int8
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return {
        "files": sorted(set(files)),
        "opset": opset,
        "max_abs_diff_vs_torch": cfg.get("max_abs_diff_vs_torch"),
        "int8": cfg.get("int8"),
    }


def _source_fingerprint(model: nn.Module) -> str:
    from clipforge.models.encode import fingerprint

    return getattr(model, "source_fingerprint", None) or fingerprint(model)


def onnx_input_names(path: Path) -> list[str]:
    """Input names as the saved graph has them (not as they were passed to the exporter)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def graph_inputs(session: Any) -> set[str]:
    """The inputs a graph really takes: the TorchScript exporter drops an unused one (a text tower that
    ignores ``attention_mask``, as open_clip's CoCa does), and onnxruntime rejects a feed it does not name."""
    return {i.name for i in session.get_inputs()}


def sessions(directory: str | Path, threads: int | None = None, int8: bool | str = False, spin: bool = False):
    """(image, text) onnxruntime sessions of an export dir (``threads``: intra-op threads;
    ``int8``: the quantized graphs where the export has them, else the fp32 ones).

    ``spin=False``: idle intra-op threads sleep instead of busy-waiting. On a shared CPU (a server
    beside its decode threads, other jobs) spinning steals the cores the next op needs: towers model,
    2 threads, load ~8 on 2 cores: one image 22 ms without spinning vs 57 ms with, 8 texts 51 vs 134.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers = ["CPUExecutionProvider"]
    return tuple(
        ort.InferenceSession(str(p), opts, providers=providers) for p in graph_paths(directory, int8)
    )


def int8_sides(int8: bool | str) -> tuple[bool, bool]:
    """``int8`` as (image, text): True or ``all`` both graphs, ``text`` / ``image`` one, False / ``none``
    neither (the text graph is the one whose int8 copy holds its accuracy: bench_onnx.py --accuracy)."""
    if isinstance(int8, bool):
        return int8, int8
    if int8 not in ("none", "text", "image", "all"):
        raise ValueError(f"int8 must be a bool or one of none, text, image, all; got {int8!r}")
    return int8 in ("image", "all"), int8 in ("text", "all")


def graph_paths(directory: str | Path, int8: bool | str = False) -> tuple[Path, Path]:
    """(image, text) graph files: the int8 copy of each where asked for (:func:`int8_sides`) and
    present, else fp32."""
    d = Path(directory)
    sides = int8_sides(int8)

    def pick(f: str, want: bool) -> Path:
        return d / int8_name(f) if want and (d / int8_name(f)).is_file() else d / f

    return pick(IMAGE_FILE, sides[0]), pick(TEXT_FILE, sides[1])


def check_parity(
    model: nn.Module, directory: str | Path, int8: bool | str = False
) -> dict[str, float] | None:
    """Largest |onnxruntime - torch| on a batch of 3 (another size than the traced one), None without ort."""
    try:
        img, txt = sessions(directory, int8=int8)
    except ImportError:
        return None
    pixels, tokens = probe_inputs(model, 3)
    with torch.no_grad():
        a, b = model.encode_image(pixels), model.encode_text(tokens)
    oa = img.run(None, {"pixels": pixels.numpy()})[0]
    names = graph_inputs(txt)
    ob = txt.run(None, {k: v.numpy() for k, v in tokens.items() if k in names})[0]
    return {
        "image": float((a - torch.from_numpy(oa)).abs().max()),
        "text": float((b - torch.from_numpy(ob)).abs().max()),
    }
