"""Robustness curve: corruptions are deterministic and grow with severity; the run writes JSON + PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evalutils import ColorPrototypeModel
from PIL import Image

from clipforge.evaluate.robustness import CORRUPTIONS, corrupt, run_robustness


def _img() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_grows_with_severity(kind: str) -> None:
    img = _img()
    assert corrupt(img, kind, 0) is img
    a = np.asarray(img, dtype=np.float32)
    diffs = []
    for s in (1, 2, 3):
        x = corrupt(img, kind, s, np.random.default_rng(1))
        y = corrupt(img, kind, s, np.random.default_rng(1))
        assert x.size == img.size and np.array_equal(np.asarray(x), np.asarray(y))  # seeded
        diffs.append(float(np.abs(np.asarray(x, dtype=np.float32) - a).mean()))
    assert 0 < diffs[0] <= diffs[1] <= diffs[2], diffs
    with pytest.raises(ValueError):
        corrupt(img, kind, 4)


def test_run_writes_curve(color_shards, tmp_path: Path) -> None:
    shards, cn = color_shards
    cfg = {"shards": [str(s) for s in shards], "classnames": str(cn), "templates": "simple", "limit": 0,
           "output": str(tmp_path / "out"), "progress": False, "batch_size": 8}  # fmt: skip
    rep = run_robustness(ColorPrototypeModel().eval(), cfg)
    assert [r["task"] for r in rep["results"]] == [f"robustness/{c}" for c in CORRUPTIONS]
    m = rep["results"][0]["metrics"]
    assert (
        m["top1_clean"] == 1.0 and m["n_images"] == 34 and rep["bad_samples"]["total"] == 2
    )  # one per shard
    assert all(0 <= r["metrics"]["top1_s3"] <= 1 for r in rep["results"])
    assert (tmp_path / "out" / "robustness.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"][1]["levels"] == [0.4, 0.7, 1.0]
    with pytest.raises(ValueError, match="classnames"):
        run_robustness(ColorPrototypeModel().eval(), {"shards": [str(shards[0])], "progress": False})


def test_cli(color_shards, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipforge.models
    from clipforge.cli import main

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: ColorPrototypeModel().eval())
    shards, cn = color_shards
    argv = ["eval", "robustness", "--model", "p", "--shards", str(shards[0]), "--classnames", str(cn),
            "--templates", "simple", "--corruptions", "blur", "jpeg", "--output", str(tmp_path / "o"),
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "blur" in out and "jpeg" in out and "contrast" not in out
    assert main([*argv, "--corruptions", "fog"]) == 2
    assert "unknown corruption" in capsys.readouterr().err
