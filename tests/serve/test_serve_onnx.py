"""``clipforge serve --runtime onnx``: /classify and /search answer as the torch runtime does.

The model is scratch:vit-nano (its exported graphs in onnxruntime); the index is built with torch, so
the onnx server also checks that an fp32 export counts as the model that built the index.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

LABELS = ["a red square", "a green square", "a blue square", "a dog"]


@pytest.fixture(scope="module")
def nano_index(tmp_path_factory, nano, shard_writer):
    from clipforge.index import BuildOptions, build_index
    write_shard = shard_writer

    d = tmp_path_factory.mktemp("nano_index")
    for i, prefix in enumerate("ab"):
        write_shard(d / f"{prefix}-00000{i}.tar", 12, prefix=prefix, start=12 * i)
    build_index(str(d / "*.tar"), nano, d / "idx", BuildOptions(batch_size=8, workers=0), progress=False)
    return d / "idx"


def _jpeg(color: tuple[int, int, int]) -> bytes:
    rng = np.random.default_rng(0)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (40, 56, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _answers(server_factory, model, index_dir, **cfg):
    from clipforge.serve import Client

    with server_factory(model, index_dir, **cfg) as url, Client(url) as c:
        health = c.health()
        classify = [c.classify(_jpeg(col), labels=LABELS, top_k=4) for col in [(220, 30, 30), (30, 40, 220)]]
        search = [c.search(text=q, k=5) for q in LABELS]
        by_image = c.search(image=_jpeg((30, 200, 40)), k=5)
    return health, classify, search + [by_image]


def _scores(answer: dict) -> list[tuple[str, float]]:
    rows = answer.get("predictions") or answer.get("results")
    assert rows, answer
    return [(r.get("label") or r["key"], float(r["score"])) for r in rows]


def test_onnx_server_answers_as_torch(server_factory, nano, nano_onnx, nano_index):
    ht, ct, st = _answers(server_factory, nano, nano_index)
    ho, co, so = _answers(server_factory, nano_onnx, nano_index, runtime="onnx")
    assert ht["runtime"] == "torch" and ho["runtime"] == "onnx"
    assert ht["model_matches_index"] is True and ho["model_matches_index"] is True
    assert ho["precision"] == {"text": "fp32", "image": "fp32"}
    for a, b in zip(ct + st, co + so):
        sa, sb = _scores(a), _scores(b)
        assert sa[0][0] == sb[0][0]  # top-1 equal
        assert len(sa) == len(sb) and max(abs(x[1] - y[1]) for x, y in zip(sa, sb)) < 1e-4


def test_torch_server_on_an_onnx_built_index(server_factory, nano, tmp_path, monkeypatch, nano_index):
    """An index built with --runtime onnx is 'built by' the torch model (and searches the same)."""
    from clipforge.index import BuildOptions, build_index

    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    shards = sorted(nano_index.parent.glob("*.tar"))
    opt = BuildOptions(batch_size=8, workers=0, runtime="onnx")
    build_index([str(s) for s in shards], nano, tmp_path / "idx", opt, progress=False, threads=1)
    ht, _, st = _answers(server_factory, nano, tmp_path / "idx")
    _, _, s_ref = _answers(server_factory, nano, nano_index)
    assert ht["model_matches_index"] is True
    for a, b in zip(st, s_ref):
        sa, sb = _scores(a), _scores(b)
        assert sa[0][0] == sb[0][0] and max(abs(x[1] - y[1]) for x, y in zip(sa, sb)) < 2e-3  # float16 rows


def test_serve_cli_runtime_onnx(nano, nano_onnx, nano_index, monkeypatch):
    import clipforge.models
    from clipforge.cli import build_parser
    from clipforge.export.runtime import OnnxClipModel
    from clipforge.serve.cli import make_service

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: nano)
    args = build_parser().parse_args(
        ["serve", "--index", str(nano_index), "--runtime", "onnx", "--onnx-dir", str(nano_onnx.directory)]
        + ["--threads", "1", "--no-batching"]
    )
    svc = make_service(args)
    assert isinstance(svc.model, OnnxClipModel) and svc.model_matches_index and svc.runtime == "onnx"
    svc = make_service(build_parser().parse_args(["serve", str(nano_onnx.directory), "--runtime", "onnx"]))
    assert isinstance(svc.model, OnnxClipModel)
    args = build_parser().parse_args(["serve", "--index", str(nano_index)])
    assert make_service(args).runtime == "torch"  # the default stays torch


def test_runtime_config_is_checked(tmp_path):
    from clipforge.config import ConfigError
    from clipforge.serve.config import ServeConfig

    assert ServeConfig().runtime == "torch"
    with pytest.raises(ConfigError, match="runtime"):
        ServeConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="bf16"):
        ServeConfig(runtime="onnx", precision="bf16")
    with pytest.raises(ConfigError, match="captioner"):
        ServeConfig(runtime="onnx", captioner=str(tmp_path))
    with pytest.raises(ConfigError, match="onnx_dir"):
        ServeConfig(onnx_dir=str(tmp_path))
