"""The saved captioner: round trip with its vocabulary and DeCap memory, projection, encoder check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.caption.captioner import Captioner, encoder_fingerprint
from clipforge.caption.decoder import CaptionDecoder, DecoderConfig
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.vocab import build_vocab


def make(tmp_path, memory: torch.Tensor | None = None, spec: str = "towers:none", fp: str = "") -> Captioner:
    vocab = build_vocab(["a dog runs", "a cat sleeps"], min_count=1)
    torch.manual_seed(0)
    dec = CaptionDecoder(DecoderConfig(vocab_size=len(vocab), cond_dim=4, width=16, heads=2, layers=1))
    meta = {"mode": "text-only" if memory is not None else "paired", "decap_temperature": 0.01,
            "encoder": {"model": spec, "condition": "embedding", "fingerprint": fp}}  # fmt: skip
    cap = Captioner(dec.eval(), vocab, meta, memory)
    cap.save(tmp_path / "cap")
    return Captioner.load(tmp_path / "cap")


def test_round_trip_keeps_memory_and_captions(tmp_path):
    mem = F.normalize(torch.randn(6, 4), dim=-1).half()
    cap = make(tmp_path, mem)
    assert torch.equal(cap.memory, mem) and cap.mode == "text-only"
    cond = torch.randn(3, 4)
    again = Captioner.load(tmp_path / "cap")
    assert cap.caption(cond, DecodeOptions(method="greedy")) == again.caption(
        cond, DecodeOptions(method="greedy")
    )


def test_decap_projection_lands_on_the_memory(tmp_path):
    mem = F.normalize(torch.randn(6, 4), dim=-1)
    cap = make(tmp_path, mem.half())
    x = mem[2:3] + 0.05 * torch.randn(1, 4)
    sharp = cap.project(x, temperature=1e-3)  # tiny T: the nearest memory row
    assert torch.allclose(sharp, F.normalize(mem[2:3].half().float(), dim=-1), atol=1e-2)
    soft = cap.project(x, temperature=100.0)  # huge T: the (normalized) mean of the memory
    assert torch.allclose(soft, F.normalize(mem.half().float().mean(0, keepdim=True), dim=-1), atol=1e-2)
    assert torch.equal(cap.project(x, temperature=0), x)  # 0: off


def test_encoder_fingerprint_mismatch_is_refused(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from caption_testutils import tiny_clip

    good = encoder_fingerprint(tiny_clip(), "embedding")
    cap = make(tmp_path, spec="py:caption_testutils:tiny_clip", fp=good)
    assert encoder_fingerprint(cap.load_encoder("py:caption_testutils:tiny_clip"), "embedding") == good
    cap.meta["encoder"]["fingerprint"] = "0" * 16
    with pytest.raises(ValueError, match="fingerprint"):
        cap.load_encoder("py:caption_testutils:tiny_clip")
    with pytest.raises(ValueError, match="--encoder"):
        cap.load_encoder()  # a py: spec from the file is never run
