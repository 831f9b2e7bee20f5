"""The model card every export writes (README.md): what the model is, how it was made, how it scored.

Training data and recipe come from the run's ``config.yaml`` (the run dir holding a trained model dir,
``runs/NAME/model``); eval results from a ``results.json`` beside the model or in the run dir (or the
file given with ``--eval-results``). Missing facts are written as unknown, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

RUN_CONFIG = "config.yaml"
RESULTS = "results.json"


def find_run_files(source: str | None) -> tuple[Path | None, Path | None]:
    """(run config.yaml, results.json) found beside a saved model dir, or (None, None)."""
    if not source or not Path(source).is_dir():
        return None, None
    d = Path(source).resolve()
    config = next((p for p in (d / RUN_CONFIG, d.parent / RUN_CONFIG) if p.is_file()), None)
    results = next(
        (p for p in (d / RESULTS, d.parent / RESULTS, d.parent / "eval" / RESULTS) if p.is_file()), None
    )
    return config, results


def _run_facts(config: Path | None) -> list[str]:
    if config is None:
        return ["- training run config: not found beside the model (unknown data and recipe)"]
    from clipforge.config import load_file

    try:
        cfg = load_file(config)
    except Exception as e:  # a card never fails an export: say what could not be read
        return [f"- training run config: {config} could not be read ({type(e).__name__}: {e})"]
    lines = [f"- training run config: `{config}`"]
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if data:
        lines.append(f"- training data: `{json.dumps(data, default=str)[:600]}`")
    keys = ("model", "loss", "epochs", "steps", "batch_size", "lr", "optim", "seed", "precision", "schedule")
    recipe = {k: cfg[k] for k in keys if isinstance(cfg, dict) and k in cfg}
    if recipe:
        lines.append(f"- recipe: `{json.dumps(recipe, default=str)[:600]}`")
    lines.append("")
    lines.append(
        "<details><summary>full run config</summary>\n\n```yaml\n"
        + config.read_text()[:8000]
        + "\n```\n</details>"
    )
    return lines


def _results(path: Path | None) -> list[str]:
    if path is None:
        return ["No eval results found (run `clipforge eval run` and export again, or pass --eval-results)."]
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"`{path}` could not be read ({type(e).__name__})."]
    return [f"From `{path}`:", "", "```json", json.dumps(res, indent=2, default=str)[:6000], "```"]


def write_card(
    model: nn.Module,
    out: Path,
    fmt: str,
    summary: dict[str, Any],
    source: str | None = None,
    eval_results: str | Path | None = None,
) -> Path:
    """Write ``out/README.md``; -> its path."""
    config, results = find_run_files(source)
    if eval_results:
        results = Path(eval_results)
    desc = model.describe()
    c = model.config
    arch = [
        f"- spec: `{c.spec}` (backend `{c.backend}`, class `{type(model).__name__}`)",
        f"- parameters: {desc['params']:,}; embedding dim {c.embed_dim}; context length {c.context_length}",
        f"- preprocessing: `{json.dumps(c.preprocess)}`",
        f"- logit scale (exp): {float(model.logit_scale.detach().exp()):.4f}"
        + (
            ""
            if model.logit_bias is None
            else f"; logit bias {float(model.logit_bias.detach()):.4f} (SigLIP-style)"
        ),
    ]
    notes = [f"- {n}" for n in summary.get("notes", [])]
    text = "\n".join(
        [
            "---",
            "license: other  # set the license of the training data and of the base weights before publishing",
            "library_name: clipforge",
            f"tags: [clip, zero-shot-image-classification, {fmt}]",
            "---",
            "",
            f"# {c.spec} ({fmt} export)",
            "",
            "Exported by `clipforge export`. Files: " + ", ".join(f"`{f}`" for f in summary.get("files", [])),
            "",
            "## Architecture",
            *arch,
            *notes,
            "",
            "## Training data and recipe",
            *_run_facts(config),
            "",
            "## Evaluation",
            *_results(results),
            "",
            "## License",
            "Not set by clipforge: the export inherits the licenses of the base weights "
            f"(`{c.spec}`) and of the training data above. Fill in the `license` field before publishing.",
            "",
            "## Intended use and limits",
            "- Intended: research and prototyping of zero-shot classification and image-text retrieval, "
            "on data like the training data.",
            "- Not for decisions about people (identification, surveillance) or any high-stakes use without "
            "an evaluation on the target data; contrastive image-text models inherit the biases of their "
            "web-scale or small training captions and can be confidently wrong out of domain.",
            "- Small-data models (e.g. trained on Flickr8k) generalise poorly beyond everyday scenes; read "
            "the eval results above before relying on it.",
            "",
        ]
    )
    path = out / "README.md"
    path.write_text(text)
    return path
