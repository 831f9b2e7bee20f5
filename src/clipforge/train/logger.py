"""Run logging: metrics.jsonl (one JSON row per logged step), TensorBoard if installed, a curve PNG.

On resume, rows after the checkpoint's step are dropped first, so the log reads like one clean run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            rows = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)
            except Exception:  # tensorboard not installed: optional
                self.tb = None

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
        return rows

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss and learning rate against step, side by side (Agg backend: no display needed)."""
    if not metrics_path.exists():
        return None
    rows = MetricsLogger.read(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    coca = any("caption_loss" in r for r in rows)
    a.plot(steps, [r["loss"] for r in rows], label="total (contrastive + w x caption)" if coca else "loss")
    for extra in ("contrastive_loss", "caption_loss") if coca else ():  # coca: both parts of the loss
        a.plot(steps, [r.get(extra, float("nan")) for r in rows], label=extra.replace("_", " "))
    if coca:
        a.legend()
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("training loss")
    b.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    b.set_title("schedule")
    fig.tight_layout()
    from clipforge.utils import atomic_path

    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png_path
