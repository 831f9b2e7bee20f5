"""--format onnx: two graphs with dynamic batch/seq axes whose onnxruntime outputs equal torch's (1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _check(model, out, pixels, TEXTS) -> None:
    from clipforge.export.onnx import sessions
    from clipforge.models.tokenizer import Tokenizer

    cfg = json.loads((out / "onnx_config.json").read_text())
    assert cfg["opset"] == 17 and cfg["normalized"] is True
    assert json.loads((out / "preprocess.json").read_text()) == json.loads(
        json.dumps(model.config.preprocess)
    )
    tok = Tokenizer.from_dir(out)  # the shipped tokenizer gives the model's ids
    img, txt = sessions(out, threads=2)
    for n in (1, 5):  # batch sizes other than the traced one (2): the axes are dynamic
        px = pixels(model, n, seed=n)
        tokens = tok(TEXTS[:n] if n <= len(TEXTS) else TEXTS + TEXTS[: n - len(TEXTS)])
        ref_tokens = model.tokenize(TEXTS[:n] if n <= len(TEXTS) else TEXTS + TEXTS[: n - len(TEXTS)])
        assert torch.equal(tokens["input_ids"], ref_tokens["input_ids"])
        with torch.no_grad():
            a, b = model.encode_image(px), model.encode_text(ref_tokens)
        oa = torch.from_numpy(img.run(None, {"pixels": px.numpy()})[0])
        ob = torch.from_numpy(txt.run(None, {k: v.numpy() for k, v in tokens.items()})[0])
        assert oa.shape == a.shape and ob.shape == b.shape
        assert (oa - a).abs().max() < 1e-4
        assert (ob - b).abs().max() < 1e-4


def test_onnx_scratch_vit(nano, tmp_path, pixels, texts):
    from clipforge.export import export_model

    s = export_model(nano, "onnx", tmp_path / "onnx")
    assert max(s["max_abs_diff_vs_torch"].values()) < 1e-4
    assert {"image.onnx", "text.onnx", "tokenizer.json", "README.md"} <= {
        p.name for p in (tmp_path / "onnx").iterdir()
    }
    _check(nano, tmp_path / "onnx", pixels, texts)


def test_onnx_towers(towers, tmp_path, pixels, texts):
    from clipforge.export import export_model

    export_model(towers, "onnx", tmp_path / "onnx")
    _check(towers, tmp_path / "onnx", pixels, texts)


def test_onnx_refuses_non_empty_output(nano, tmp_path):
    from clipforge.export import export_model
    from clipforge.utils import OutputExistsError

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        export_model(nano, "onnx", tmp_path / "o")
