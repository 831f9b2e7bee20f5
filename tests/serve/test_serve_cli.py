"""`clipforge serve` argument handling -> a ClipService (the uvicorn run itself is covered by ServerThread)."""

from __future__ import annotations

import pytest

from clipforge.cli import build_parser, main


@pytest.fixture
def tiny_resolver(monkeypatch, tiny_model_serve):
    import clipforge.models

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: tiny_model_serve)


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


def _serve_parser():
    import argparse

    p = argparse.ArgumentParser()
    from clipforge.serve.cli import register

    register(p.add_subparsers())
    return p


def test_every_serve_config_field_has_a_flag_and_defaults_live_once(monkeypatch):
    import dataclasses

    from clipforge.serve.cli import serve_config
    from clipforge.serve.config import ServeConfig

    monkeypatch.delenv("CLIPFORGE_API_KEY", raising=False)
    (serve,) = [a for a in _serve_parser()._subparsers._actions if a.choices][0].choices.values()
    dests = {a.dest for a in serve._actions}
    assert {f.name for f in dataclasses.fields(ServeConfig)} <= dests
    assert serve_config(_serve_parser().parse_args(["serve", "m"])) == ServeConfig()  # no second default
    args = ["serve", "m", "--cors-origin", "a", "--cors-origin", "b", "--max-upload-mb", "1.5"]
    args += ["--max-templates", "3", "--no-allow-image-urls", "--max-image-batch", "none"]
    cfg = serve_config(_serve_parser().parse_args(args))
    assert cfg.cors_origins == ["a", "b"] and cfg.max_upload_bytes == int(1.5 * (1 << 20))
    assert cfg.max_templates == 3 and cfg.max_image_batch is None


def test_serve_config_is_strict():
    from clipforge.config import ConfigError
    from clipforge.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="did you mean 'max_batch'"):
        ServeConfig.from_dict({"max_bach": 4})
    with pytest.raises(ConfigError, match="max_k"):
        ServeConfig.from_dict({"max_k": 0})
    assert ServeConfig.from_dict({"max_k": 7}).max_k == 7


def test_api_version_is_the_package_version(tiny_model_serve, monkeypatch):
    import clipforge
    from clipforge.serve.app import create_app
    from clipforge.serve.service import ClipService

    monkeypatch.setattr(clipforge, "__version__", "9.8.7")
    assert create_app(ClipService(tiny_model_serve, None)).version == "9.8.7"
