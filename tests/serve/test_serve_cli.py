"""`clipforge serve` argument handling -> a ClipService (the uvicorn run itself is covered by ServerThread)."""

from __future__ import annotations

import pytest

from clipforge.cli import build_parser, main


@pytest.fixture
def tiny_resolver(monkeypatch, tiny_model_serve):
    import clipforge.index.encode as enc

    monkeypatch.setattr(enc, "load_model_spec", lambda spec, **kw: tiny_model_serve)


def test_serve_args_build_a_service(tiny_resolver, tiny_index_dir, tmp_path):
    from clipforge.serve.cli import make_service

    labels = tmp_path / "mine.txt"
    labels.write_text("cat\ndog\n")
    args = build_parser().parse_args(
        ["serve", "--index", str(tiny_index_dir), "--no-batching", "--max-k", "7", "--api-key", "k"]
        + ["--label-set", f"mine={labels}", "--cors-origin", "*", "--max-upload-mb", "1"]
    )
    svc = make_service(args)  # MODEL omitted: the index's model is used
    assert svc.index is not None and svc.index.count == 48
    assert svc.cfg.max_k == 7 and svc.cfg.api_key == "k" and not svc.cfg.batching
    assert svc.cfg.max_upload_bytes == 1 << 20 and svc.cfg.cors_origins == ["*"]
    assert svc.label_set("mine") == ["cat", "dog"]
    assert svc.text_batcher.max_batch == 1 and svc.image_batcher.max_batch == 1
    args = build_parser().parse_args(["serve", "tiny", "--max-batch", "16", "--max-image-batch", "4"])
    svc = make_service(args)
    assert svc.index is None and svc.text_batcher.max_batch == 16 and svc.image_batcher.max_batch == 4


def test_serve_bad_args_exit_2(tiny_resolver, tmp_path):
    assert main(["serve"]) == 2  # neither model nor index
    assert main(["serve", "tiny", "--index", str(tmp_path / "missing")]) == 2
    assert main(["serve", "tiny", "--label-set", "x=/no/such/file"]) == 2
