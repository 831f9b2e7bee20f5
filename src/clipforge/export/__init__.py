"""``clipforge export``: a clipforge model out in the format its users deploy (one module per format).

    export_model("runs/exp1/model", "onnx", "out/onnx")     # two ONNX graphs + tokenizer + preprocessing
    export_model("scratch:vit-tiny", "hf", "out/hf")         # transformers CLIPModel dir
    export_model("runs/exp1/model", "openclip", "out/oc")    # open_clip hub layout

Every export also writes a model card (card.py). The formats a model maps onto: :func:`formats_for`.
An onnx export runs in onnxruntime behind the encode interface: ``runtime.OnnxClipModel(DIR, threads)``;
``runtime.load_runtime(MODEL, "torch"|"onnx", threads)`` is the ``--runtime`` switch (serve, index),
exporting MODEL once into ``$CLIPFORGE_CACHE/onnx/FINGERPRINT``.
"""

from __future__ import annotations

from clipforge.export.api import FORMATS, ExportError, export_model, formats_for

__all__ = ["FORMATS", "ExportError", "export_model", "formats_for"]
