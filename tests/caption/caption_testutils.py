"""The shared fake CLIP (tests/fake_clip.py) as caption tests use it (``py:caption_testutils:tiny_clip``),
and shard slices."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from clipforge.models.base import ModelConfig

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # tests/ holds the shared fake (a py: spec subprocess may have only this dir)
    sys.path.append(_TESTS)

import fake_clip  # noqa: E402


class HashTokenizer(fake_clip.HashTokenizer):
    """Padded to the batch's longest caption (16 words at most); a caption without words gets id 1."""

    def __init__(self) -> None:
        super().__init__(512, empty_id=1)


class TinyCaptionClip(fake_clip.TinyClip):
    """Locked towers: image features are 4x4 average colours (48 values), text a frozen bag of words."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config, width=16, split="locked", emb_scale=1.0, zero_bias=True, order=("emb", "img", "txt"),
            tokenizer=HashTokenizer(),
        )  # fmt: skip

    # the names the caption tests use
    tok = property(lambda self: self.emb)
    img_proj = property(lambda self: self.img)
    txt_proj = property(lambda self: self.txt)


def tiny_clip() -> TinyCaptionClip:
    cfg = ModelConfig(
        backend="py", spec="py:caption_testutils:tiny_clip", embed_dim=16, preprocess={"size": 32}
    )
    return TinyCaptionClip(cfg).eval()


def slice_shard(src: Path, dst: Path, n: int, corrupt: str | None = None) -> Path:
    """The first ``n`` samples of a shard; ``corrupt``: a key added with undecodable JPEG bytes."""
    keys: list[str] = []
    with tarfile.open(src) as t, tarfile.open(dst, "w") as o:
        for m in t:
            k = m.name.split(".")[0]
            if k not in keys:
                if len(keys) == n:
                    break
                keys.append(k)
            o.addfile(m, t.extractfile(m))
        if corrupt:
            import io

            for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a broken sample")):
                info = tarfile.TarInfo(f"{corrupt}.{ext}")
                info.size = len(data)
                o.addfile(info, io.BytesIO(data))
    return dst


def memorize(model, cond, captions: list[str], vocab, steps: int):
    """Train ``model`` full-batch on (cond, captions) for ``steps`` AdamW steps; return it and the
    special ids decoding needs. Shared by the decoding tests of every decoder kind."""
    import torch

    from clipforge.caption.decoding import SpecialIds
    from clipforge.caption.train import caption_loss, pad_tokens

    tokens = pad_tokens(vocab.encode(captions), vocab.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = caption_loss(model, cond, tokens, vocab.pad_id, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), SpecialIds(vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id)
