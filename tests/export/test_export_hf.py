"""--format hf: transformers.AutoModel.from_pretrained(DIR) gives clipforge's embeddings (1e-5)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch


def _features(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _same_as_transformers(model, d, pixels, texts) -> None:
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(str(d)).eval()
    px = pixels(model, 3)
    tokens = model.tokenize(texts)
    ids = AutoTokenizer.from_pretrained(str(d))(texts, padding=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], tokens["input_ids"])  # the shipped tokenizer gives the same ids
    with torch.no_grad():
        a = _features(hf.get_image_features(pixel_values=px))
        b = _features(hf.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]))
        assert (a - model.encode_image(px, normalize=False)).abs().max() < 1e-5
        assert (b - model.encode_text(tokens, normalize=False)).abs().max() < 1e-5
        assert torch.allclose(hf.logit_scale, model.logit_scale)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(model.config.preprocess["mean"])


def test_hf_checkpoint_round_trip(tiny_hf_clip_dir, tmp_path, pixels, texts):
    from clipforge.export import export_model
    from clipforge.models import load_model

    model = load_model(f"hf:{tiny_hf_clip_dir}")
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # a trained scale is the one exported, not the checkpoint's copy
    export_model(model, "hf", tmp_path / "hf")
    _same_as_transformers(model, tmp_path / "hf", pixels, texts)
    back = load_model(f"hf:{tmp_path / 'hf'}")  # and clipforge reads its own export
    px = pixels(model, 2)
    with torch.no_grad():
        assert (back.encode_image(px) - model.encode_image(px)).abs().max() < 1e-6
        assert (
            back.encode_text(model.tokenize(texts)) - model.encode_text(model.tokenize(texts))
        ).abs().max() < 1e-6


def test_hf_scratch_vit(nano, tmp_path, pixels, texts):
    from clipforge.export import export_model

    export_model(nano, "hf", tmp_path / "hf")
    _same_as_transformers(nano, tmp_path / "hf", pixels, texts)


def test_towers_do_not_map_to_hf(towers, tmp_path):
    from clipforge.export import ExportError, export_model

    with pytest.raises(ExportError, match="formats that work for it: onnx"):
        export_model(towers, "hf", tmp_path / "hf")
    with pytest.raises(ExportError, match="onnx"):
        export_model(towers, "openclip", tmp_path / "oc")
    assert not (tmp_path / "hf").exists()  # refused before anything was written


def test_model_card_reads_run_config_and_results(nano, tmp_path):
    from clipforge.export import export_model

    run = tmp_path / "run"
    nano.save(run / "model")
    (run / "config.yaml").write_text(
        "model: scratch:vit-nano\nloss: clip\nepochs: 3\ndata:\n  train: flickr8k\n"
    )
    (run / "results.json").write_text(json.dumps({"flickr8k": {"image_to_text_R@1": 0.123}}))
    export_model(str(run / "model"), "hf", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    for section in (
        "## Architecture",
        "## Training data and recipe",
        "## Evaluation",
        "## License",
        "## Intended use",
    ):
        assert section in card
    assert "flickr8k" in card and "0.123" in card and '"epochs": 3' in card


def test_cli_register_and_json(nano, tmp_path, capsys):
    from clipforge.export.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    nano.save(tmp_path / "m")
    args = parser.parse_args(
        ["export", str(tmp_path / "m"), "--format", "openclip", "--output", str(tmp_path / "o"), "--json"]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "openclip" and "open_clip_config.json" in summary["files"]
    again = parser.parse_args(
        ["export", str(tmp_path / "m"), "--format", "onnx", "--output", str(tmp_path / "o")]
    )
    assert again.func(again) == 2  # a non-empty output dir is refused (rc 2, the reason on stderr)
    assert "clipforge export: error:" in capsys.readouterr().err


def test_hf_siglip_round_trip(tiny_hf_clip_dir, tmp_path, pixels, texts):
    """A SigLIP checkpoint exports as SiglipModel with the trained logit scale and bias; not as open_clip."""
    from transformers import AutoModel, SiglipConfig, SiglipModel

    from clipforge.export import ExportError, export_model
    from clipforge.models import load_model

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config={**small, "vocab_size": 30522, "max_position_embeddings": 16, "pad_token_id": 0},
        vision_config={**small, "image_size": 32, "patch_size": 8},
    )
    src = tmp_path / "siglip"
    SiglipModel(cfg).eval().save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((tiny_hf_clip_dir / f).read_bytes())
    model = load_model(f"hf:{src}")
    with torch.no_grad():
        model.logit_bias.fill_(-4.25)
    export_model(model, "hf", tmp_path / "hf")
    hf = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    px = pixels(model, 2)
    tokens = model.tokenize(texts)
    with torch.no_grad():
        assert (
            _features(hf.get_image_features(pixel_values=px)) - model.encode_image(px, normalize=False)
        ).abs().max() < 1e-5
        out = _features(
            hf.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        assert (out - model.encode_text(tokens, normalize=False)).abs().max() < 1e-5
        assert float(hf.logit_bias) == pytest.approx(-4.25)
    with pytest.raises(ExportError, match="SigLIP"):
        export_model(model, "openclip", tmp_path / "oc")


def test_failed_export_leaves_no_partial_dir(nano, tmp_path, monkeypatch):
    import clipforge.export.card as card
    from clipforge.export import export_model

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "write_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(nano, "openclip", tmp_path / "oc")
    assert not (tmp_path / "oc").exists()
