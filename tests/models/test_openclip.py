"""openclip:DIR / openclip:NAME=FILE: open_clip ViT checkpoints in, and scratch ViTs out and back.

The reference here is an independent forward of open_clip's layout straight from its state dict
(fused in_proj attention, class token after ln_post, ``x @ proj``, EOT pooling), so the tensor mapping
in clipforge.models.openclip is checked against the layout, not against itself. Parity with open_clip
itself: benchmarks/openclip_parity.py (side venv).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import clipforge.models.openclip as oc
from clipforge.models.tokenizer import minilm_dir

TEXTS = ["a dog", "two children playing football on a sunny beach", "x"]


def tiny_cfg(**over) -> dict:
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 30522,
            "width": 32,
            "heads": 4,
            "layers": 2,
            "pool_type": "eos",
            "eos_id": 102,
            "pad_id": 0,
        },
    }
    cfg.update(over)
    return cfg


def random_openclip_sd(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {}

    def blocks(prefix: str, w: int, n: int) -> None:
        for i in range(n):
            p = f"{prefix}.{i}"
            for ln in ("ln_1", "ln_2"):
                sd[f"{p}.{ln}.weight"], sd[f"{p}.{ln}.bias"] = 1 + r(w), r(w)
            sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"] = r(w, w), r(w)
            sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"] = r(w, 4 * w), r(w)

    vw, n_patch = v["width"], (v["image_size"] // v["patch_size"]) ** 2
    sd["visual.class_embedding"] = r(vw)
    sd["visual.positional_embedding"] = r(n_patch + 1, vw)
    sd["visual.conv1.weight"] = r(vw, 3, v["patch_size"], v["patch_size"])
    for ln in ("ln_pre", "ln_post"):
        sd[f"visual.{ln}.weight"], sd[f"visual.{ln}.bias"] = 1 + r(vw), r(vw)
    sd["visual.proj"] = r(vw, d)
    blocks("visual.transformer.resblocks", vw, v["layers"])
    tw = t["width"]
    sd["token_embedding.weight"] = r(t["vocab_size"], tw)
    sd["positional_embedding"] = r(t["context_length"], tw)
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(tw), r(tw)
    sd["text_projection"] = r(tw, d)
    blocks("transformer.resblocks", tw, t["layers"])
    sd["logit_scale"] = torch.tensor(2.0)
    if "init_logit_bias" in cfg:
        sd["logit_bias"] = torch.tensor(-3.5)
    return sd


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def _blocks(x, sd, prefix, heads, quick, mask=None):
    act = (lambda z: z * torch.sigmoid(1.702 * z)) if quick else F.gelu
    i = 0
    while f"{prefix}.{i}.ln_1.weight" in sd:
        p, w = f"{prefix}.{i}", x.shape[-1]
        mha = nn.MultiheadAttention(w, heads, batch_first=True)
        mha.load_state_dict(
            {
                k: sd[f"{p}.attn.{k}"]
                for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            }
        )
        h = _ln(x, sd, f"{p}.ln_1")
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = _ln(x, sd, f"{p}.ln_2")
        x = x + F.linear(
            act(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])),
            sd[f"{p}.mlp.c_proj.weight"],
            sd[f"{p}.mlp.c_proj.bias"],
        )
        i += 1
    return x


def reference_image(sd, cfg, px):
    v = cfg["vision_cfg"]
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _blocks(
        _ln(x, sd, "visual.ln_pre"),
        sd,
        "visual.transformer.resblocks",
        v["width"] // v["head_width"],
        cfg.get("quick_gelu"),
    )
    return _ln(x, sd, "visual.ln_post")[:, 0] @ sd["visual.proj"]


def reference_text(sd, cfg, ids):
    t = cfg["text_cfg"]
    L = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    mask = torch.full((L, L), float("-inf")).triu(1)
    x = _ln(_blocks(x, sd, "transformer.resblocks", t["heads"], cfg.get("quick_gelu"), mask), sd, "ln_final")
    idx = (
        ids.argmax(-1) if t.get("pool_type", "argmax") == "argmax" else (ids == t["eos_id"]).int().argmax(-1)
    )
    return x[torch.arange(len(ids)), idx] @ sd["text_projection"]


def write_hub(d, cfg, sd, pre=None, bin_file=False):
    d.mkdir(parents=True, exist_ok=True)
    (d / oc.CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre or {}}))
    if bin_file:
        torch.save(sd, d / "open_clip_pytorch_model.bin")
    else:
        save_file(sd, str(d / "open_clip_model.safetensors"))
    (d / "tokenizer.json").write_bytes((minilm_dir() / "tokenizer.json").read_bytes())
    return d


def _compare(model, sd, cfg):
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        assert (model.encode_image(px, normalize=False) - reference_image(sd, cfg, px)).abs().max() < 1e-5
        assert (
            model.encode_text(tokens, normalize=False) - reference_text(sd, cfg, tokens["input_ids"])
        ).abs().max() < 1e-5
        assert float(model.logit_scale.detach()) == pytest.approx(2.0)


@pytest.mark.parametrize("variant", ["gelu", "quick_gelu", "siglip_bias", "bin"])
def test_openclip_dir_matches_reference(tmp_path, variant):
    from clipforge.models import load_model

    over = {"quick_gelu": True} if variant == "quick_gelu" else {}
    if variant == "siglip_bias":
        over["init_logit_bias"] = -10.0
    cfg = tiny_cfg(**over)
    sd = random_openclip_sd(cfg)
    pre = {
        "size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    d = write_hub(tmp_path / "oc", cfg, sd, pre, bin_file=variant == "bin")
    model = load_model(f"openclip:{d}")
    _compare(model, sd, cfg)
    assert (
        model.config.preprocess["mean"] == (0.5, 0.5, 0.5)
        and model.config.preprocess["resize_mode"] == "squash"
    )
    assert model.config.preprocess["interpolation"] == "bilinear"
    if variant == "siglip_bias":
        assert float(model.logit_bias.detach()) == pytest.approx(-3.5)


def test_argmax_pooling_and_named_config(tmp_path, monkeypatch):
    """CLIP-BPE checkpoints pool at the highest id; ``openclip:NAME=FILE`` takes a named layout."""
    from clipforge.models import load_model

    cfg = tiny_cfg()
    cfg["text_cfg"] = {k: v for k, v in cfg["text_cfg"].items() if k not in ("pool_type", "eos_id")}
    sd = random_openclip_sd(cfg)
    save_file(sd, str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(oc.NAMED, "ViT-tiny-test", cfg)
    config = oc.build_config(f"openclip:ViT-tiny-test={tmp_path / 'w.safetensors'}")
    from clipforge.models.tokenizer import Tokenizer

    model = oc.build(config, tokenizer=Tokenizer.minilm(context_length=24)).eval()
    _compare(model, sd, cfg)
    with pytest.raises(ValueError, match="unknown named config"):
        load_model(f"openclip:ViT-X-99={tmp_path / 'w.safetensors'}")


def test_unmappable_layouts_are_named(tmp_path):
    from clipforge.models import load_model

    cfg = tiny_cfg()
    cfg["vision_cfg"]["attentional_pool"] = True
    cfg["text_cfg"]["embed_cls"] = True
    d = write_hub(tmp_path / "oc", cfg, random_openclip_sd(tiny_cfg()))
    with pytest.raises(ValueError, match="attentional_pool.*embed_cls"):
        load_model(f"openclip:{d}")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from clipforge.models import load_model

    cfg = tiny_cfg()
    d = write_hub(tmp_path / "oc", cfg, random_openclip_sd(cfg))
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(f"openclip:{d}")


def test_scratch_round_trip_after_training(tmp_path):
    """Load a scratch ViT, train 2 steps, export to open_clip's layout, load back: equal outputs;
    and the loaded model saves / reloads as a clipforge dir."""
    from clipforge.export import export_model
    from clipforge.models import load_model

    model = load_model("scratch:vit-nano")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(TEXTS)
    for _ in range(2):
        img, txt, scale, _bias = model(px, tokens)
        logits = scale * img @ txt.t()
        loss = F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    export_model(model, "openclip", tmp_path / "oc")
    cfg = json.loads((tmp_path / "oc" / oc.CONFIG_FILE).read_text())
    assert cfg["model_cfg"]["text_cfg"]["pool_type"] == "eos" and cfg["preprocess_cfg"]["size"] == 64
    back = load_model(f"openclip:{tmp_path / 'oc'}")
    with torch.no_grad():
        assert (back.encode_image(px) - model.encode_image(px)).abs().max() < 1e-6
        assert (back.encode_text(tokens) - model.encode_text(tokens)).abs().max() < 1e-6
        assert torch.allclose(back.logit_scale, model.logit_scale)
    back.save(tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again.encode_image(px), back.encode_image(px))


def test_weights_that_do_not_fit_the_config(tmp_path):
    from clipforge.models import load_model

    cfg = tiny_cfg()
    sd = random_openclip_sd(cfg)
    sd["visual.proj"] = torch.zeros(32, 8)  # embed_dim 8 in the weights, 16 in the config
    d = write_hub(tmp_path / "oc", cfg, sd)
    with pytest.raises(ValueError, match="do not fit"):
        load_model(f"openclip:{d}")
    (d / oc.CONFIG_FILE).write_text(json.dumps({"model_cfg": {"vision_cfg": {}}}))
    with pytest.raises(ValueError, match="embed_dim"):
        load_model(f"openclip:{d}")
