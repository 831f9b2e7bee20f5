"""The one entry point: resolve the model, check the format maps, write the files, then the model card."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

FORMATS: dict[str, str] = {
    "onnx": "clipforge.export.onnx",
    "hf": "clipforge.export.hf",
    "openclip": "clipforge.export.openclip",
}


class ExportError(ValueError):
    """The model's architecture does not map onto the format (the message names those that do)."""


def formats_for(model: nn.Module) -> list[str]:
    """The export formats this model's architecture maps onto."""
    return [f for f, mod in FORMATS.items() if importlib.import_module(mod).supports(model) is None]


def check_format(model: nn.Module, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (valid: {', '.join(FORMATS)})")
    why = importlib.import_module(FORMATS[fmt]).supports(model)
    if why is not None:
        ok = formats_for(model)
        raise ExportError(
            f"cannot export {model.config.spec} as {fmt}: {why}; formats that work for it: "
            f"{', '.join(ok) or 'none'}"
        )


def export_model(
    model: nn.Module | str | Path,
    fmt: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    eval_results: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write ``model`` (a loaded model, spec or saved dir) as ``fmt`` into ``output``; -> a summary dict.

    ``output`` must be missing or empty (``overwrite=True`` replaces it): an export never mixes with
    an older one. ``options`` go to the format (onnx: ``opset``).
    """
    import shutil

    import clipforge.models.openclip  # noqa: F401  (registers openclip: where registry.py does not list it yet)
    from clipforge.export.card import write_card
    from clipforge.utils import prepare_output_dir

    source = None
    if not isinstance(model, nn.Module):
        from clipforge.models import load_model

        source = str(model)
        model = load_model(source, allow_code=True)
    check_format(model, fmt)
    out = prepare_output_dir(output, overwrite=overwrite)  # missing or empty from here on: all ours
    model.eval()
    try:
        summary = importlib.import_module(FORMATS[fmt]).export(model, out, **options)
        summary = {"format": fmt, "output": str(out), "spec": model.config.spec, **summary}
        summary["card"] = str(write_card(model, out, fmt, summary, source=source, eval_results=eval_results))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-written export that looks complete
        raise
    return summary
