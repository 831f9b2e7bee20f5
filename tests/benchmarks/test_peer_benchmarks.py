"""The peer-benchmark plumbing (issue 16): run_all's table rows and merge, clip-back's index layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import run_all  # noqa: E402


def _search(qps: float, cpu: float) -> dict:
    return {"qps": qps, "p50_ms": 10.0, "p99_ms": 20.0, "errors": 0, "server_cpu_ms_per_req": cpu}


def test_read_serve_with_and_without_clip_back() -> None:
    ours, peer, ratio = run_all.read_serve({"search": _search(100.0, 5.0)})
    assert "100.0 QPS" in ours and "not measured" in peer and ratio == "—"
    r = {
        "search_onnx": _search(90.0, 4.0),
        "clip_back": {
            "search": _search(30.0, 20.0),
            "vs_clipforge_runtime": "onnx",  # compared with the onnx server: its row is read
            "agreement_vs_clipforge": {"top10_overlap": 1.0},
        },
    }
    ours, peer, ratio = run_all.read_serve(r)
    assert "90.0 QPS" in ours and "30.0 QPS" in peer
    assert ratio.startswith("3.00x QPS, 5.0x less server CPU") and "1.00 overlap" in ratio


def test_read_ingest_reports_size_agreement() -> None:
    res = {"samples_per_s": 10.0, "cpu_s_per_sample": 0.01, "written": 8, "output_bytes": 2e6}
    r = {"results": {"clipforge": res, "img2dataset": res}, "n_urls": 10, "ratio_samples_per_s": 1.0}
    r |= {
        "success_counts_agree": True,
        "sizes_agree": False,
        "sizes_differ": 2,
        "resize": "shortest side 256",
    }
    ratio = run_all.read_ingest(r)[2]
    assert "counts agree" in ratio and "2 SIZES DIFFER" in ratio and "shortest side 256" in ratio


def test_merge_keeps_rows_not_rerun_marked_with_their_date(tmp_path: Path) -> None:
    old = {
        "machine": {"date_utc": "2026-01-01 10:00", "loadavg": [1.0]},
        "rows": [
            {"stage": "old ingest", "command": "python benchmarks/bench_ingest.py --n 5", "ratio": "2x"},
            {"stage": "old onnx", "command": "python benchmarks/bench_onnx.py", "ratio": "3x"},
        ],
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps(old))
    new = [{"stage": "ingest now", "script": "bench_ingest.py", "ratio": "1.5x"}]
    rows = run_all.merge_earlier(new, path, run_all.stages())
    assert [r["script"] for r in rows] == ["bench_ingest.py", "bench_onnx.py"]  # re-run one replaced
    assert rows[0]["ratio"] == "1.5x" and "earlier" not in rows[0]
    assert rows[1]["earlier"].startswith("2026-01-01 10:00")
    assert run_all.merge_earlier(new, tmp_path / "none.json", run_all.stages()) == new


def test_clip_back_folder_serves_our_index_file(tmp_path: Path) -> None:
    faiss = pytest.importorskip("faiss")
    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    bench_serve = pytest.importorskip("bench_serve")

    index = tmp_path / "index"
    index.mkdir()
    vecs = np.random.default_rng(0).standard_normal((5, 8)).astype("float32")
    ix = faiss.IndexFlatIP(8)
    ix.add(vecs)
    faiss.write_index(ix, str(index / "index.faiss"))
    pq.write_table(
        pa.table({"uid": [f"k{i}" for i in range(5)], "caption": list("abcde")}), index / "meta.parquet"
    )
    paths = bench_serve.clip_back_folder(index, tmp_path / "work")
    folder = Path(json.loads(paths.read_text())["bench"])
    got = faiss.read_index(str(folder / "image.index"))
    d, i, e = got.search_and_reconstruct(vecs[:1], 2)  # what clip-back calls
    assert i[0][0] == 0 and np.allclose(e[0][0], vecs[0])
    meta = pq.read_table(folder / "metadata" / "0.parquet").to_pylist()
    assert meta[3] == {"url": "k3", "caption": "d"}  # row order kept: row i of the index is row i here
