"""``clipforge eval``: --json contract, results.json content, compare deltas, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalutils import TinyClip

from clipforge.cli import main


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipforge.models

    monkeypatch.setattr(
        clipforge.models, "load_model", lambda spec, **kw: TinyClip(seed=int(spec[-1])).eval()
    )


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_zeroshot_probe_retrieval_and_compare(patched, color_shards, tmp_path: Path, capsys) -> None:
    shards, cn = color_shards
    spec = str(shards[0].parent / "color-*.tar")
    common = ["--shards", spec, "--workers", "0", "--threads", "1", "--json"]
    rc, out, _ = _run(["eval", "zeroshot", "--model", "t0", "--classnames", str(cn), "--templates", "simple",
                       "--output", str(tmp_path / "a"), *common], capsys)  # fmt: skip
    assert rc == 0
    res = json.loads(out)  # exactly one JSON object on stdout
    r = res["results"][0]
    assert r["task"] == "zeroshot" and r["templates"] == "simple" and r["n_images"] == 34
    assert 0.0 <= r["metrics"]["top1"] <= 1.0 and "confusion" not in r
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["model"]["spec"] == "test:tiny" and len(saved["results"][0]["shards"]["sha256"]) == 64
    assert (tmp_path / "a" / "confusion_custom.png").exists()

    rc, out, _ = _run(["eval", "zeroshot", "--model", "t1", "--classnames", str(cn), "--templates", "simple",
                       "--output", str(tmp_path / "b"), *common], capsys)  # fmt: skip
    rc, out, _ = _run(["eval", "compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json"),
                       "--json"], capsys)  # fmt: skip
    cmp = json.loads(out)
    row = next(x for x in cmp["rows"] if x["metric"] == "top1")
    assert row["delta"] == pytest.approx(row["b"] - row["a"]) and cmp["warnings"] == []
    rc, out, _ = _run(
        ["eval", "compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")],
        capsys,
    )
    assert rc == 0 and "top1" in out and "B-A" in out

    rc, out, _ = _run(
        ["eval", "retrieval", "--model", "t0", "--output", str(tmp_path / "c"), *common], capsys
    )
    m = json.loads(out)["results"][0]["metrics"]
    assert rc == 0 and m["n_texts"] == 68 and m["image_to_text_R@10"] >= m["image_to_text_R@1"]

    rc, out, _ = _run(["eval", "probe", "--model", "t0", "--classnames", str(cn), "--output", str(tmp_path / "d"),
                       "--solver", "sklearn", *common], capsys)  # fmt: skip
    r = json.loads(out)["results"][0]
    assert rc == 0 and r["metrics"]["solver"] == "sklearn" and sum(r["split"]["sizes"]) == 34


def test_errors_are_clear(patched, color_shards, tmp_path: Path, capsys) -> None:
    shards, _ = color_shards
    with pytest.raises(SystemExit, match="--classnames"):
        main(["eval", "zeroshot", "--model", "t0", "--shards", str(shards[0]), "--output", str(tmp_path)])
    rc, _, err = _run(["eval", "retrieval", "--model", "t0", "--shards", str(tmp_path / "nope.tar")], capsys)
    assert rc == 2 and "not found" in err
    (tmp_path / "x.json").write_text("{}")
    rc, _, err = _run(["eval", "compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")], capsys)
    assert rc == 2 and "not a clipforge eval result" in err


def test_runtime_onnx_gives_torch_metrics(color_shards, tmp_path: Path, capsys) -> None:
    """``--runtime onnx``: the model's onnx export (made once into the cache) scores as torch (1e-4)."""
    pytest.importorskip("onnxruntime")
    shards, cn = color_shards
    spec = str(shards[0].parent / "color-*.tar")
    common = ["--model", "scratch:vit-nano", "--shards", spec, "--workers", "0", "--threads", "1", "--json"]
    got = {}
    zs = ["--classnames", str(cn), "--templates", "simple"]
    for runtime in ("torch", "onnx"):
        for task, extra in (("zeroshot", zs), ("retrieval", [])):
            rc, out, err = _run(["eval", task, *common, *extra, "--runtime", runtime,
                                 "--output", str(tmp_path / f"{task}-{runtime}")], capsys)  # fmt: skip
            assert rc == 0, err
            res = json.loads(out)
            got[task, runtime] = res["results"][0]["metrics"]
            if runtime == "onnx":
                assert res["model"]["runtime"] == "onnx" and res["model"]["source_spec"] == "scratch:vit-nano"
    for task in ("zeroshot", "retrieval"):
        a, b = got[task, "torch"], got[task, "onnx"]
        nums = [k for k, v in a.items() if isinstance(v, float)]
        assert nums and all(abs(a[k] - b[k]) <= 1e-4 for k in nums), task
    exports = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(exports) == 1  # exported once, reused by the second task
    rc, _, err = _run(["eval", "retrieval", *common, "--runtime", "onnx", "--precision", "bf16"], capsys)
    assert rc == 2 and "fp32 graphs" in err
    rc, _, err = _run(["eval", "retrieval", "--model", str(exports[0]), "--shards", spec, "--workers", "0",
                       "--output", str(tmp_path / "x")], capsys)  # fmt: skip
    assert rc == 2 and "--runtime onnx" in err
