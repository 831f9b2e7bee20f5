"""A tiny ClipModel for trainer tests (fast on CPU; lockable towers; saves itself as safetensors + JSON)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clipforge.models.base import ClipModel, ModelConfig


class HashTokenizer:
    """Words -> ids by crc32 (stable across processes), padded to the batch's longest caption."""

    pad_token_id = 0

    def __init__(self, vocab: int = 512, max_len: int = 16):
        self.vocab, self.max_len = vocab, max_len

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [
            [1 + zlib.crc32(w.lower().encode()) % (self.vocab - 1) for w in t.split()][: self.max_len]
            for t in texts
        ]
        n = max(1, max(len(i) for i in ids))
        input_ids = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            input_ids[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


class TinyClip(ClipModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        o = config.options
        d = config.embed_dim
        self.tokenizer = HashTokenizer()
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

    @property
    def image_locked(self) -> bool:
        return bool(self.config.options.get("lock_image"))

    @property
    def text_locked(self) -> bool:
        return bool(self.config.options.get("lock_text"))

    def image_features(self, pixels):
        x = self.conv(pixels)
        return {"pooled": nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)}

    def image_head(self, feats):
        return self.img_proj(feats["pooled"])

    def text_features(self, tokens):
        m = tokens["attention_mask"].unsqueeze(-1).float()
        x = self.txt_norm(self.tok(tokens["input_ids"]))
        return {"pooled": (x * m).sum(1) / m.sum(1).clamp(min=1)}

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
