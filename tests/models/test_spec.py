"""The one spec parser, the one backend table, strict options and configs."""

from __future__ import annotations

import json

import pytest

from clipforge.config import ConfigError
from clipforge.models import build_config, load_model, parse_spec
from clipforge.models.registry import BACKENDS, Backend, get_backend, register_backend
from clipforge.models.types import ModelConfig


@pytest.mark.parametrize(
    "spec,backend,target,image,text",
    [
        ("towers:efficientnet-lite0+minilm-l6", "towers", "efficientnet-lite0+minilm-l6",
         "efficientnet-lite0", "minilm-l6"),
        ("towers:hf-image=/c/a+b+hf-text=/c/t", "towers", "hf-image=/c/a+b+hf-text=/c/t",
         "hf-image=/c/a+b", "hf-text=/c/t"),
        ("towers:hf-image=/c/d+minilm-l6", "towers", "hf-image=/c/d+minilm-l6", "hf-image=/c/d", "minilm-l6"),
        ("hf:/ckpts/clip", "hf", "/ckpts/clip", "", ""),
        ("scratch:vit-nano", "scratch", "vit-nano", "", ""),
        ("py:pkg.mod:make", "py", "pkg.mod:make", "", ""),
    ],
)  # fmt: skip
def test_parse_spec_forms(spec, backend, target, image, text):
    s = parse_spec(spec)
    assert (s.backend, s.target, s.image, s.text) == (backend, target, image, text)
    assert str(s) == spec and parse_spec(s) is s


def test_parse_spec_saved_dir_and_errors(tmp_path):
    m = load_model("scratch:vit-nano")
    out = m.save(tmp_path / "a:b" / "model")  # a ':' in a saved dir's path is still a saved dir
    assert parse_spec(out).backend == "saved" and str(parse_spec(str(out))) == str(out)
    with pytest.raises(ValueError, match="unknown model spec 'nope:thing'"):
        parse_spec("nope:thing")
    with pytest.raises(FileNotFoundError, match="not a saved clipforge model"):
        parse_spec(tmp_path)
    with pytest.raises(ValueError, match="IMAGE\\+TEXT"):
        parse_spec("towers:efficientnet-lite0")
    with pytest.raises(ValueError, match="py:MODULE:FUNCTION"):
        parse_spec("py:justamodule")
    with pytest.raises(ValueError, match="empty"):
        parse_spec("scratch:")


def test_unknown_model_option_fails_with_did_you_mean():
    with pytest.raises(
        ConfigError, match="'image_hed' \\(did you mean 'image_head'\\?\\).*valid towers options"
    ):
        build_config("towers:efficientnet-lite0+minilm-l6", image_hed="mlp")
    with pytest.raises(ConfigError, match="valid: activation, context_length"):
        load_model("scratch:vit-nano", unlock_image=0)  # scratch towers always train: no such option
    cfg = build_config("scratch:vit-nano", activation="quick_gelu", loss="siglip")
    assert cfg.backend == "scratch" and cfg.init_logit_bias == -10.0


def test_model_config_from_dict_is_strict():
    d = build_config("scratch:vit-nano").to_dict()
    assert ModelConfig.from_dict(d) == build_config("scratch:vit-nano")
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        ModelConfig.from_dict({**d, "embed_dimm": 3})


def test_saved_config_may_not_name_code_backends(tmp_path):
    out = load_model("scratch:vit-nano").save(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "backend": "py", "spec": "py:os:system"}))
    with pytest.raises(ValueError, match="unknown model backend 'py'"):
        load_model(out)


def test_py_factory_spec_checks_its_signature(tmp_path, monkeypatch):
    (tmp_path / "my_factory.py").write_text(
        "from clipforge.models import load_model\n"
        "def make(dim: int = 16):\n"
        "    return load_model('scratch:vit-nano', embed_dim=dim)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model("py:my_factory:make", allow_code=True, dim=24).config.embed_dim == 24
    with pytest.raises(ConfigError, match="did you mean 'dim'"):
        load_model("py:my_factory:make", allow_code=True, dims=24)


def test_py_spec_runs_no_code_unless_the_caller_allows_it(tmp_path):
    """A spec read from a file (index manifest, captioner config) reaches load_model without
    allow_code: naming code there must not import or call it."""
    pwned = tmp_path / "pwned"
    with pytest.raises(ValueError, match="imports and calls code"):
        load_model("py:os:system", command=f"touch {pwned}")
    assert not pwned.exists()


def test_a_new_backend_is_one_table_entry(monkeypatch):
    monkeypatch.setitem(BACKENDS, "tiny", BACKENDS["scratch"])  # keep the table clean after the test
    register_backend(Backend("tiny", "clipforge.models.scratch", "tiny:NAME"))
    assert get_backend("tiny").syntax == "tiny:NAME"
    assert parse_spec("tiny:vit-nano").backend == "tiny"
    with pytest.raises(ValueError):
        register_backend(Backend("saved", "x", "x"))


def test_saved_dir_format_is_unchanged(tmp_path):
    """config.json keeps the pre-redesign keys (dirs saved before it load, dirs saved now load in it)."""
    out = load_model("scratch:vit-nano").save(tmp_path / "m")
    keys = set(json.loads((out / "config.json").read_text()))
    old = {"backend", "spec", "embed_dim", "init_logit_scale", "init_logit_bias", "preprocess"}
    assert keys == old | {"context_length", "options", "weights"}
    again, fresh = load_model(out).config.to_dict(), build_config("scratch:vit-nano").to_dict()
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(fresh))  # (tuples come back as lists)
