"""``curate run --runtime onnx``: clip-score from the model's onnx export equals torch's (1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("onnxruntime")

from clipforge.curate.engine import run_curation  # noqa: E402
from clipforge.curate.stages import CurateConfig  # noqa: E402


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cf_cache")  # one export of vit-nano for the module


@pytest.fixture(autouse=True)
def _cache(cache_root, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(cache_root))


def _scores(out) -> dict[str, float | None]:
    return {r["key"]: r["clip_score"] for r in pq.read_table(out / "scores.parquet").to_pylist()}


def _run(shards, out, runtime: str, **kw):
    cfg = CurateConfig(stages=["clip-score", "safety"], batch_size=4, runtime=runtime, **kw.pop("cfg", {}))
    return run_curation([str(s) for s in shards], out, cfg, progress=False, **kw)


def test_onnx_clip_scores_equal_torch(shards, tmp_path, nano, cache_root):
    _run(shards, tmp_path / "torch", "torch", model=nano)
    _run(shards, tmp_path / "onnx", "onnx", model=nano)  # a torch model handed in: exported once
    a, b = _scores(tmp_path / "torch"), _scores(tmp_path / "onnx")
    assert a.keys() == b.keys() and len(a) == 20
    assert a["s0_004"] is None and b["s0_004"] is None  # the corrupt image stays a null row
    ka = [k for k in a if a[k] is not None]
    assert np.allclose([a[k] for k in ka], [b[k] for k in ka], atol=1e-4)
    assert len(list((cache_root / "onnx").iterdir())) == 1  # the export went to the cache
    ua = pq.read_table(tmp_path / "torch" / "scores.parquet").column("unsafe_score").to_pylist()
    ub = pq.read_table(tmp_path / "onnx" / "scores.parquet").column("unsafe_score").to_pylist()
    ok = [i for i, v in enumerate(ua) if v is not None]
    assert np.allclose([ua[i] for i in ok], [ub[i] for i in ok], atol=1e-4)


def test_onnx_runtime_from_spec_and_from_export_dir(shards, tmp_path, nano, nano_onnx):
    """``--model SPEC --runtime onnx`` loads and exports the spec; an export dir runs as is."""
    _run(shards, tmp_path / "torch", "torch", model=nano)
    _run(shards, tmp_path / "spec", "onnx", cfg={"model": "scratch:vit-nano"})
    _run(shards, tmp_path / "dir", "onnx", cfg={"model": str(nano_onnx.directory)})
    a = _scores(tmp_path / "torch")
    for other in ("spec", "dir"):
        b = _scores(tmp_path / other)
        ka = [k for k in a if a[k] is not None]
        assert np.allclose([a[k] for k in ka], [b[k] for k in ka], atol=1e-4), other
    with pytest.raises(ValueError, match="runtime onnx"):  # an export dir is not a torch model
        _run(shards, tmp_path / "bad", "torch", cfg={"model": str(nano_onnx.directory)})


def test_onnx_refuses_what_the_graphs_cannot_do(shards, tmp_path, nano):
    with pytest.raises(ValueError, match="pre-head features"):
        run_curation([str(s) for s in shards], tmp_path / "c", CurateConfig(stages=["copy"], runtime="onnx"),
                     model=nano, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="drop --image-size"):
        _run(shards, tmp_path / "s", "onnx", model=nano, cfg={"image_size": 32})


def test_cli_runtime_onnx(shards, tmp_path, nano, capsys):
    """``clipforge curate run --runtime onnx``: the generated flag reaches the clip-score stage."""
    from clipforge.cli import main

    _run(shards, tmp_path / "torch", "torch", model=nano)
    argv = ["curate", "run", "--data", *map(str, shards), "--output", str(tmp_path / "cli"), "--stages",
            "clip-score", "--model", "scratch:vit-nano", "--runtime", "onnx", "--threads", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 20
    a, b = _scores(tmp_path / "torch"), _scores(tmp_path / "cli")
    ka = [k for k in a if a[k] is not None]
    assert np.allclose([a[k] for k in ka], [b[k] for k in ka], atol=1e-4)
    cfg = (tmp_path / "cli" / "config.yaml").read_text()
    assert "runtime: onnx" in cfg
