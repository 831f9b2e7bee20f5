"""A tiny ClipModel for trainer tests (fast on CPU; lockable towers; saves itself as safetensors + JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clipforge.models.base import ModelConfig

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # tests/ holds the shared fake (a py: spec subprocess may have only this dir)
    sys.path.append(_TESTS)

import fake_clip  # noqa: E402
from fake_clip import bag  # noqa: E402


class HashTokenizer(fake_clip.HashTokenizer):
    """Words -> ids by crc32 (stable across processes), padded to the batch's longest caption."""

    def __init__(self, vocab: int = 512, max_len: int = 16):
        super().__init__(vocab, max_len=max_len)


class TinyClip(fake_clip.TinyClip):
    """The shared fake with trainable towers: a conv + BatchNorm image trunk, a LayerNorm word table, MLP
    heads with dropout; PyTorch's default init from the global seed. ``lock_image`` / ``lock_text`` in the
    options freeze a trunk (the fake's locked properties read them)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, order=(), seed=None, tokenizer=HashTokenizer())
        o = config.options
        d = config.embed_dim
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.GELU())
        self.img_proj = nn.Sequential(
            nn.Linear(8 * 4 * 4, 32), nn.Dropout(o.get("dropout", 0.0)), nn.Linear(32, d)
        )
        self.tok = nn.Embedding(512, 16)
        self.txt_norm = nn.LayerNorm(16)
        self.txt_proj = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, d))
        for p in self.conv.parameters():
            p.requires_grad_(not o.get("lock_image"))
        for p in [*self.tok.parameters(), *self.txt_norm.parameters()]:
            p.requires_grad_(not o.get("lock_text"))

    def image_features(self, pixels):
        return {"pooled": self.pool(self.conv(pixels))}

    def image_head(self, feats):
        return self.img_proj(feats["pooled"])

    def text_features(self, tokens):
        return {"pooled": bag(self.txt_norm(self.tok(tokens["input_ids"])), tokens["attention_mask"])}

    def text_head(self, feats):
        return self.txt_proj(feats["pooled"])

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors")
        )
        (directory / "config.json").write_text(json.dumps(self.config.to_dict()))
        return directory


def make_tiny(
    lock_image: int = 0, lock_text: int = 0, dropout: float = 0.0, seed: int = 0, size: int = 16
) -> TinyClip:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backend="scratch",
        spec=f"py:tiny_model:make_tiny?lock_image={lock_image}&lock_text={lock_text}",
        embed_dim=16,
        preprocess={"size": size},
        options={"lock_image": int(lock_image), "lock_text": int(lock_text), "dropout": float(dropout)},
    )
    return TinyClip(cfg)


def make_tiny_scratch(lock_image: int = 0, seed: int = 0, image_size: int = 32):
    """``scratch:vit-nano`` (transformers CLIP modules: two 2-layer towers, width 64) at 32 px, seeded;
    ``lock_image=1`` freezes the vision tower (cached features: a world-size-independent global batch)."""
    from clipforge.models.hf import HFClipModel
    from clipforge.models.scratch import build_config
    from clipforge.models.tokenizer import Tokenizer

    torch.manual_seed(seed)
    cfg = build_config("scratch:vit-nano", image_size=image_size)
    cfg.options["unlock_image"] = 0 if lock_image else -1
    tok = Tokenizer.minilm(context_length=cfg.context_length)
    return HFClipModel(cfg, tokenizer=tok, pretrained=False)


def torchrun_train(
    out: Path,
    model: str,
    shards: list[str],
    env: dict,
    nproc: int,
    args: list[str],
    timeout: int = 300,
    hook_args: list[str] | None = None,
) -> list[dict]:
    """``torchrun --nproc_per_node=N clipforge train`` on a locked-image tiny model (cached image features:
    the global batch is the same for any world size); returns the metrics.jsonl rows.

    ``hook_args`` (e.g. ``["--keys-log", PATH]``) runs train_with_hooks.py instead of the CLI, so each
    rank gets the test hooks through ``train(cfg, hooks=...)``."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if hook_args is None:
        cmd += ["-m", "clipforge.cli", "train"]
    else:
        cmd += [str(Path(__file__).resolve().parent / "train_with_hooks.py"), *hook_args, "--"]
    cmd += ["--model", model, "--model-opt", "lock_image=1"]
    cmd += ["--data", *shards, "--output", str(out), "--cache-dir", str(out.parent / "cache")]
    cmd += ["--threads", "1", "--workers", "0", "--no-progress", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
