from __future__ import annotations

import json

import pytest
import torch

from clipforge.models import load_model
from clipforge.models.factory import load_saved
from clipforge.models.io import save_model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_scratch_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = load_model("scratch:vit-nano", loss="siglip")
    with torch.no_grad():
        m.logit_bias.fill_(-3.25)
    out = m.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backend"] == "scratch" and cfg["weights"] == "all"
    again = load_model(out)
    _same_state(m, again)
    px, tok = torch.randn(2, 3, 64, 64), m.tokenize(["a dog", "grass"])
    assert torch.equal(again.encode_image(px), m.encode_image(px))
    assert torch.equal(again.encode_text(tok), m.encode_text(tok))
    # overwriting an existing save is atomic and leaves no temp dirs behind
    m.save(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_hf_round_trip_without_the_original_checkpoint(tmp_path, tiny_siglip_dir):
    m = load_model(f"hf:{tiny_siglip_dir}")
    save_model(m, tmp_path / "m")
    again = load_saved(tmp_path / "m")
    _same_state(m, again)
    assert again.tokenizer.pad_to_max and again.logit_bias.item() == pytest.approx(-7.5)


@pytest.mark.slow  # loads the real towers twice and writes ~110 MB
def test_towers_full_and_trainable_only_round_trips(tmp_path, towers_model):
    m = towers_model
    with torch.no_grad():
        m.image_proj.weight.add_(0.5)
    save_model(m, tmp_path / "full")
    _same_state(m, load_saved(tmp_path / "full"))
    save_model(m, tmp_path / "small", trainable_only=True)
    small = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert small < (tmp_path / "full" / "model.safetensors").stat().st_size / 20
    _same_state(m, load_saved(tmp_path / "small"))


def test_corrupt_or_missing_dirs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_saved(tmp_path)
    m = load_model("scratch:vit-nano")
    m.save(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd.pop(next(iter(sd)))
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_saved(tmp_path / "m")
