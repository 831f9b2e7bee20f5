"""OnnxClipModel: an onnx export dir through clipforge's encode layer gives the torch model's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_onnx_runtime_through_encode_layer(nano, tmp_path, texts):
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel
    from clipforge.models.encode import embed_pil_images, embed_texts, fingerprint

    export_model(nano, "onnx", tmp_path / "onnx")
    rt = OnnxClipModel(tmp_path / "onnx", threads=1)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    a, b = embed_pil_images(rt, images), embed_pil_images(nano, images)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    ta, tb = embed_texts(rt, texts), embed_texts(nano, texts)
    assert np.abs(ta - tb).max() < 1e-4
    assert fingerprint(rt) != fingerprint(nano)
    assert float(rt.logit_scale.exp()) == pytest.approx(float(nano.logit_scale.detach().exp()), rel=1e-6)
    with pytest.raises(ValueError, match="unit-norm"):
        rt.encode_image(torch.zeros(1, 3, 64, 64), normalize=False)


def test_not_an_export_dir(tmp_path):
    from clipforge.export.runtime import OnnxClipModel

    with pytest.raises(FileNotFoundError, match="not an onnx export"):
        OnnxClipModel(tmp_path)


def test_int8_text_graph(nano, tmp_path, texts):
    """--quantize text: an int8 copy of the text graph beside the fp32 ones, picked by int8=True; close to fp32."""
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel
    from clipforge.models.encode import embed_texts

    s = export_model(nano, "onnx", tmp_path / "onnx", quantize_int8="text")
    assert (tmp_path / "onnx" / "text.int8.onnx").is_file() and not (
        tmp_path / "onnx" / "image.int8.onnx"
    ).exists()
    assert s["int8"]["files"] == ["text.int8.onnx"]
    fp32, int8 = (
        OnnxClipModel(tmp_path / "onnx", threads=1),
        OnnxClipModel(tmp_path / "onnx", threads=1, int8=True),
    )
    a, b = embed_texts(fp32, texts), embed_texts(int8, texts)
    cos = (a * b).sum(1)
    assert cos.min() > 0.9 and np.abs(a - b).max() > 0  # quantized: close, not identical
    px = torch.zeros(1, 3, 64, 64)
    assert torch.equal(fp32.encode_image(px), int8.encode_image(px))  # the image graph stays fp32
    with pytest.raises(ValueError, match="quantize"):
        export_model(nano, "onnx", tmp_path / "bad", quantize_int8="int4")


def test_sessions_sleep_instead_of_spinning(nano, tmp_path):
    """Idle onnxruntime threads must not busy-wait: on a shared CPU that halved --runtime onnx."""
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel

    export_model(nano, "onnx", tmp_path / "onnx")
    for sess in (rt := OnnxClipModel(tmp_path / "onnx", threads=2)).image_session, rt.text_session:
        opts = sess.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.intra_op_num_threads == 2


def test_int8_one_side_of_an_all_export(nano, tmp_path, texts):
    """int8='text' on a --quantize all export: the int8 text graph, the fp32 image graph (the
    combination bench_onnx.py --accuracy measures); identity follows what was actually quantized."""
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel, model_identity
    from clipforge.models.encode import embed_texts, fingerprint

    export_model(nano, "onnx", tmp_path / "onnx", quantize_int8="all")
    d = tmp_path / "onnx"
    fp32, text8, all8 = (
        OnnxClipModel(d, 1),
        OnnxClipModel(d, 1, int8="text"),
        OnnxClipModel(d, 1, int8="all"),
    )
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fp32.encode_image(px), text8.encode_image(px))
    assert not torch.equal(fp32.encode_image(px), all8.encode_image(px))
    assert np.array_equal(embed_texts(text8, texts), embed_texts(all8, texts))
    assert np.abs(embed_texts(fp32, texts) - embed_texts(text8, texts)).max() > 0
    assert model_identity(fp32) == fingerprint(nano) and model_identity(text8) != fingerprint(nano)
    assert (
        text8.describe()["int8"] == "text" and OnnxClipModel(d, 1, int8="none").describe()["int8"] == "none"
    )
    with pytest.raises(ValueError, match="int8 must be"):
        OnnxClipModel(d, 1, int8="int4")
