"""open_clip CoCa checkpoints: features, decoder logits and greedy captions equal open_clip's own.

Fixtures: tests/export/data/openclip_parity/coca-* (benchmarks/openclip_parity.py ``write``, run in a
side venv with open_clip 3.3.0). Captions go through the caption stage's one decoding implementation.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.caption.decoding import DecodeOptions, SpecialIds, generate, generate_candidates

FIXTURES = Path(__file__).parent / "data" / "openclip_parity"
FAMILIES = sorted(p.name for p in FIXTURES.glob("coca-*") if (p / "reference.safetensors").is_file())
GREEDY = {"method": "greedy", "no_repeat_ngram": 0, "min_len": 0}  # the reference's argmax loop


def test_coca_families_are_there():
    assert FAMILIES == ["coca-gelu", "coca-ls-quickgelu-bias", "coca-nopool"]


def _load(family: str):
    from clipforge.models.openclip import build, build_config

    d = FIXTURES / family
    ref = load_file(str(d / "reference.safetensors"))
    # the fixtures carry token ids, not text: no tokenizer is needed for these checks
    return build(build_config(f"openclip:{d}"), tokenizer=object()).eval(), ref


def _ids(ref) -> SpecialIds:
    sot, eot, pad = ref["special_ids"].tolist()
    return SpecialIds(bos=sot, eos=eot, pad=pad, unk=pad)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_and_logits_equal_open_clip(family):
    model, ref = _load(family)
    with torch.no_grad():
        image = model.encode_image(ref["pixels"], normalize=False)
        text = model.encode_text({"input_ids": ref["input_ids"]}, normalize=False)
        tokens = model.caption_tokens(ref["pixels"])
        logits = model.caption_logits(ref["pixels"], ref["input_ids"])
    assert (image - ref["image"]).abs().max() < 1e-5
    assert (text - ref["text"]).abs().max() < 1e-5  # rows with pads: open_clip's shifted pad mask
    assert (tokens - ref["image_tokens"]).abs().max() < 1e-5
    assert (logits - ref["logits"]).abs().max() < 1e-5
    assert torch.allclose(model.logit_scale.detach(), ref["logit_scale"][0])
    if "logit_bias" in ref:
        assert torch.allclose(model.logit_bias.detach(), ref["logit_bias"][0])
    else:
        assert model.logit_bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_through_decoding_equals_open_clip(family):
    model, ref = _load(family)
    steps = ref["greedy"].shape[1]
    with torch.no_grad():
        cond = model.caption_tokens(ref["pixels"])
    seqs, _ = generate(model.caption_decoder, cond, DecodeOptions(**GREEDY, max_len=steps), _ids(ref))
    want = [[t for t in row if t != _ids(ref).pad] for row in ref["greedy"].tolist()]
    want = [row[: row.index(_ids(ref).eos)] if _ids(ref).eos in row else row for row in want]
    assert seqs == want
    assert len({tuple(s) for s in seqs}) == len(seqs)  # the image steers the words (a real check)
    # beam search of width 1 without length penalty is greedy decoding: the cache reorder path
    beam, _ = generate(
        model.caption_decoder, cond,
        DecodeOptions(**{**GREEDY, "method": "beam"}, beam_width=1, length_penalty=0.0, max_len=steps), _ids(ref),
    )  # fmt: skip
    assert beam == want


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_equal_teacher_forcing(family):
    """start + step (KV cache through the text tower and the decoder) == the full forward per position."""
    model, ref = _load(family)
    ids = ref["input_ids"][2:3]  # the row with no pads
    dec = model.caption_decoder
    with torch.no_grad():
        cond = model.caption_tokens(ref["pixels"][2:3])
        logits, cache = dec.start(cond, int(ids[0, 0]))
        got = [logits]
        for t in range(1, ids.shape[1]):
            got.append(dec.step(ids[:, t], cache))
    assert (torch.stack(got, 1) - ref["logits"][2:3]).abs().max() < 1e-5
    with torch.no_grad():
        assert (dec(cond, ids) - ref["logits"][2:3]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="decoding past"):
        dec.step(ids[:, 0], cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_and_sampling_run(family):
    model, ref = _load(family)
    with torch.no_grad():
        cond = model.caption_tokens(ref["pixels"])
    for opts in (
        DecodeOptions(beam_width=3, num_candidates=3, max_len=6),
        DecodeOptions(method="sample", top_k=5),
    ):
        seqs, scores = generate_candidates(model.caption_decoder, cond, opts, _ids(ref))
        assert len(seqs) == 3 and all(len(c) == opts.num_candidates for c in seqs)
        assert all(1 <= len(s) <= 11 and _ids(ref).bos not in s for c in seqs for s in c)


# -- through the product: load_model, a tokenizer, model.caption, save/load, caption-run pieces ------
def _word_tokenizer(path: Path, vocab: int = 64) -> None:
    """A word-level tokenizer for the fixture's 64 ids: w0..w61, SOT 62, EOT 63 (as CLIP's BPE names them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = {f"w{i}": i for i in range(vocab - 2)} | {
        "<|startoftext|>": vocab - 2,
        "<|endoftext|>": vocab - 1,
    }
    tok = Tokenizer(models.WordLevel(words, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab - 2), ("<|endoftext|>", vocab - 1)],
    )
    tok.save(str(path))


@pytest.fixture()
def coca_dir(tmp_path) -> Path:
    d = tmp_path / "coca"
    shutil.copytree(FIXTURES / "coca-gelu", d)
    (d / "reference.safetensors").unlink()
    _word_tokenizer(d / "tokenizer.json")
    return d


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


def _shard(path: Path, n: int, broken: int = -1) -> Path:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
            data = b"broken" if i == broken else buf.getvalue()
            for name, b in ((f"{i:04d}.png", data), (f"{i:04d}.txt", f"w{i + 5} w9 w{i + 20}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))
    return path


def test_load_model_tokenizes_embeds_and_captions(coca_dir, tmp_path):
    from clipforge.models import load_model

    model = load_model(f"openclip:{coca_dir}")
    ref = load_file(str(FIXTURES / "coca-gelu" / "reference.safetensors"))
    words = [" ".join(f"w{t}" for t in row if t not in (0, 62, 63)) for row in ref["input_ids"].tolist()]
    tokens = model.tokenize(words)
    assert torch.equal(tokens["input_ids"], ref["input_ids"])  # padded to the context length with 0
    cleaned = model.tokenize(["w5  &amp;#119;6"])["input_ids"]  # open_clip unescapes twice: "w5 w6"
    assert torch.equal(cleaned, model.tokenize(["w5 w6"])["input_ids"])
    with torch.no_grad():
        assert (model.encode_text(tokens, normalize=False) - ref["text"]).abs().max() < 1e-5
    caps = model.caption(_images(2), DecodeOptions(method="greedy", max_len=6))
    assert len(caps) == 2 and all(c and all(w.startswith("w") for w in c.split()) for c in caps)
    # the captioner surface: greedy words on the reference image tokens are open_clip's greedy ids
    texts, _ = model.captioner.caption(ref["image_tokens"], DecodeOptions(**GREEDY, max_len=8))
    assert texts == [" ".join(f"w{t}" for t in row) for row in ref["greedy"].tolist()]

    model.save(tmp_path / "saved")  # the decoder is part of the weights: no captioner dir beside them
    assert not (tmp_path / "saved" / "captioner").exists()
    back = load_model(str(tmp_path / "saved"))
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.encode_image(px), model.encode_image(px))
        assert torch.equal(back.encode_text(tokens), model.encode_text(tokens))
    assert back.caption(_images(2), DecodeOptions(method="greedy", max_len=6)) == caps


def test_onnx_export_and_runtime_of_a_coca(coca_dir, tmp_path):
    """CoCa's text tower ignores the pad mask (as open_clip's does), so the exporter drops that input:
    the parity check, the recorded config and the onnx runtime must feed only what the graph takes."""
    pytest.importorskip("onnxruntime")
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel
    from clipforge.models import load_model

    model = load_model(f"openclip:{coca_dir}").eval()
    s = export_model(model, "onnx", tmp_path / "onnx")
    assert max(s["max_abs_diff_vs_torch"].values()) < 1e-4
    cfg = json.loads((tmp_path / "onnx" / "onnx_config.json").read_text())
    assert list(cfg["text"]["inputs"]) == ["input_ids"]
    ort_model = OnnxClipModel(tmp_path / "onnx", 1)
    tokens = model.tokenize(["w5 w6 w7", "w9"])
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ort_model.encode_text(tokens) - model.encode_text(tokens)).abs().max() < 1e-4
        assert (ort_model.encode_text(tokens["input_ids"]) - model.encode_text(tokens)).abs().max() < 1e-4
        assert (ort_model.encode_image(px) - model.encode_image(px)).abs().max() < 1e-4


def test_load_captioner_and_recaption_a_shard(coca_dir, tmp_path):
    from clipforge.caption.openclip_coca import OpenClipCocaCaptioner, load_captioner
    from clipforge.caption.run import CaptionRunConfig, recaption_shard

    cap = load_captioner(f"openclip:{coca_dir}")
    assert isinstance(cap, OpenClipCocaCaptioner) and cap.meta["encoder"]["model"] == f"openclip:{coca_dir}"
    shard = _shard(tmp_path / "s-000000.tar", 4, broken=3)
    encoder = cap.load_encoder()
    cfg = CaptionRunConfig(captioner=f"openclip:{coca_dir}", data=[str(shard)], workers=0,
                           decode=DecodeOptions(method="greedy", max_len=6))  # fmt: skip
    rows, bad = recaption_shard(str(shard), cap, encoder, encoder, cfg, "encoder")
    assert rows["key"] == ["0000", "0001", "0002"] and bad.total == 1
    assert all(t and t.split()[0].startswith("w") for t in rows["caption_synthetic"])
    assert all(isinstance(s, float) for s in rows["clip_score_synthetic"] + rows["clip_score_original"])
    with pytest.raises(ValueError, match="own towers"):
        cap.load_encoder("scratch:vit-nano")


def test_unmapped_coca_layouts_are_named(tmp_path):
    from clipforge.models import load_model

    cfg = json.loads((FIXTURES / "coca-gelu" / "open_clip_config.json").read_text())
    for where, key, value in (
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("vision_cfg", "attentional_pool", "parallel"),
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ):
        d = tmp_path / key
        shutil.copytree(FIXTURES / "coca-gelu", d)
        bad = json.loads(json.dumps(cfg))
        bad["model_cfg"][where][key] = value
        (d / "open_clip_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"{where}.{key}"):
            load_model(f"openclip:{d}")


def test_weights_that_do_not_fit_a_coca_config(tmp_path):
    from clipforge.models import load_model

    d = tmp_path / "c"
    shutil.copytree(FIXTURES / "coca-gelu", d)
    _word_tokenizer(d / "tokenizer.json")
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["model_cfg"]["multimodal_cfg"]["layers"] = 3
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit.*text_decoder.cross_attn.2"):
        load_model(f"openclip:{d}")


def test_named_coca_configs_are_open_clips():
    from clipforge.models.openclip import NAMED
    from clipforge.models.openclip_coca import check_coca

    for name in ("coca_ViT-B-32", "coca_ViT-L-14"):
        check_coca(NAMED[name])
        assert (
            NAMED[name]["text_cfg"]["context_length"] == 76 and NAMED[name]["vision_cfg"]["attentional_pool"]
        )


def test_clip_bpe_file_becomes_the_tokenizer(tmp_path):
    """open_clip's bpe_simple_vocab_16e6.txt.gz (here a 3-merge one) -> CLIP's vocab.json/merges.txt:
    ids in open_clip's order (256 bytes, 256 bytes + </w>, merges, SOT, EOT), lowercased, pad 0."""
    import gzip

    from clipforge.models.openclip_coca import _tokenizer, write_clip_bpe_tokenizer

    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bpe.write_bytes(gzip.compress(b"#version: 0.2\nh e\nl l</w>\nhe ll</w>\n"))
    out = write_clip_bpe_tokenizer(bpe, tmp_path / "tok")
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["hell</w>"] == 514
    assert vocab["<|startoftext|>"] == 515 and vocab["<|endoftext|>"] == 516
    tok = _tokenizer({"bpe_file": str(bpe), "path": str(tmp_path)}, 6, 0)
    assert tok(["Hell"])["input_ids"].tolist() == [[515, 514, 516, 0, 0, 0]]
    assert tok.backend.decode([514], skip_special_tokens=True).strip() == "hell"
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        _tokenizer({"path": str(tmp_path)}, 6, 0)


def test_named_config_with_a_weights_file(tmp_path, monkeypatch):
    """``openclip:NAME=FILE`` with a CoCa named config; the tokenizer is looked for beside FILE."""
    import clipforge.models.openclip as oc
    from clipforge.models import load_model

    cfg = json.loads((FIXTURES / "coca-gelu" / "open_clip_config.json").read_text())
    monkeypatch.setitem(oc.NAMED, "coca-tiny-test", cfg["model_cfg"])
    shutil.copy(FIXTURES / "coca-gelu" / "open_clip_model.safetensors", tmp_path / "w.safetensors")
    _word_tokenizer(tmp_path / "tokenizer.json")
    ref = load_file(str(FIXTURES / "coca-gelu" / "reference.safetensors"))
    model = load_model(f"openclip:coca-tiny-test={tmp_path / 'w.safetensors'}")
    with torch.no_grad():
        assert (model.encode_image(ref["pixels"], normalize=False) - ref["image"]).abs().max() < 1e-5


def test_caption_run_and_eval_with_the_captioner_hook(coca_dir, tmp_path):
    """``caption run`` / ``caption eval`` end to end on ``--captioner openclip:DIR``: ``Captioner.load``
    hands CoCa specs to ``load_captioner``."""
    from clipforge.caption.evaluate import evaluate_captioning
    from clipforge.caption.run import run_captions

    shard = _shard(tmp_path / "s-000000.tar", 3)
    spec = f"openclip:{coca_dir}"
    decode = {"method": "beam", "beam_width": 2, "max_len": 6}
    cfg = {
        "captioner": spec,
        "data": [str(shard)],
        "output": str(tmp_path / "run"),
        "workers": 0,
        "decode": decode,
    }
    summary = run_captions(cfg, progress=False)
    assert summary["captions"] == 3 and summary["scoring_model"] == spec
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run" / "captions" / "s-000000.parquet").to_pydict()
    assert table["caption_original"][0] == "w5 w9 w20" and all(table["caption_synthetic"])
    res = evaluate_captioning(spec, str(shard), decode=DecodeOptions(**decode), workers=0)
    assert res["model"]["encoder"]["model"] == spec and res["results"][0]["metrics"]["clip_score"] is not None
