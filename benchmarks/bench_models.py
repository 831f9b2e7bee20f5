"""Model throughput on this machine: frozen-tower embedding speed and scratch ViT-B/32 training speed.

    python benchmarks/bench_models.py --json                       # everything, small sizes
    python benchmarks/bench_models.py --only images --batch 64 --iters 3

Sections:
- ``images``: EfficientNet-Lite0 frozen prefix, img/s at batch B: naive (eval, NCHW) vs channels_last
  vs BN-folded + channels_last vs + bf16 autocast vs smaller resolutions (what a locked tower runs).
- ``captions``: MiniLM-L6 locked text tower, captions/s: naive vs captions sorted by length (less
  padding) vs + bf16 autocast.
- ``scratch``: ViT-B/32 CLIP forward+backward samples/s, transformers' ``CLIPModel`` (what
  ``scratch:`` uses) vs a compact pre-LN transformer of our own (fused QKV + SDPA) with the same shapes.
Timings on a shared machine are noisy: report medians of ``--iters`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.utils import emit_json, format_table, setup_torch_threads


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_images(batch: int, iters: int) -> list[tuple[str, float]]:
    from clipforge.models.efficientnet_lite import EfficientNetLite0, FusedPrefix

    net = EfficientNetLite0.pretrained()
    rows = []
    for size in (224, 192, 160):
        x = torch.randn(batch, 3, size, size)
        xcl = x.contiguous(memory_format=torch.channels_last)
        if size == 224:
            with torch.inference_mode():
                rows.append(("naive fp32 224", batch / timed(lambda x=x: net.features(x), iters)))
                ncl = EfficientNetLite0.pretrained().to(memory_format=torch.channels_last)
                rows.append(("channels_last 224", batch / timed(lambda n=ncl, x=xcl: n.features(x), iters)))
        fused = FusedPrefix(net, 17).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            rows.append((f"fused+cl fp32 {size}", batch / timed(lambda f=fused, x=xcl: f(x), iters)))

            def bf16(f=fused, x=xcl):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return f(x)

            rows.append((f"fused+cl bf16 {size}", batch / timed(bf16, iters)))
    return rows


def bench_captions(batch: int, iters: int) -> list[tuple[str, float]]:
    import json
    from pathlib import Path

    from clipforge.data.reader import iter_tar_samples
    from clipforge.models.tokenizer import Tokenizer, minilm_dir
    from clipforge.models.tower_text import HFTextTower

    shard = Path(__file__).resolve().parents[2] / "shared/data/flickr8k/test-000000.tar"
    caps: list[str] = []
    for s in iter_tar_samples(str(shard)):
        caps += json.loads(s["json"])["captions"]
        if len(caps) >= batch * 4:
            break
    caps = caps[: batch * 4]
    tok = Tokenizer.minilm(context_length=77)
    tower = HFTextTower(minilm_dir(), unlock=0)

    def run(texts, bf16=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(texts), batch):
                tower.prefix(tok(texts[i : i + batch]))

    order = sorted(range(len(caps)), key=lambda i: tok.lengths([caps[i]])[0])
    sorted_caps = [caps[i] for i in order]
    n = len(caps)
    return [
        ("minilm fp32 unsorted", n / timed(lambda: run(caps), iters)),
        ("minilm fp32 length-sorted", n / timed(lambda: run(sorted_caps), iters)),
        ("minilm bf16 length-sorted", n / timed(lambda: run(sorted_caps, True), iters)),
    ]


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads, self.causal = heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CompactClip(nn.Module):
    """Just enough CLIP to time: patch embed + pre-LN blocks + projections (OpenAI ViT-B/32 shapes)."""

    def __init__(self, size=224, patch=32, vw=768, vl=12, vh=12, tw=512, tl=12, th=8, dim=512, vocab=30522):
        super().__init__()
        self.patch = nn.Conv2d(3, vw, patch, patch, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, vw))
        self.cls = nn.Parameter(torch.zeros(1, 1, vw))
        self.vblocks = nn.ModuleList(Block(vw, vh) for _ in range(vl))
        self.vln, self.vproj = nn.LayerNorm(vw), nn.Linear(vw, dim, bias=False)
        self.tok = nn.Embedding(vocab, tw)
        self.tpos = nn.Parameter(torch.zeros(1, 77, tw))
        self.tblocks = nn.ModuleList(Block(tw, th, causal=True) for _ in range(tl))
        self.tln, self.tproj = nn.LayerNorm(tw), nn.Linear(tw, dim, bias=False)

    def forward(self, px, ids):
        x = self.patch(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for b in self.vblocks:
            x = b(x)
        img = self.vproj(self.vln(x[:, 0]))
        t = self.tok(ids) + self.tpos[:, : ids.shape[1]]
        for b in self.tblocks:
            t = b(t)
        txt = self.tproj(self.tln(t[torch.arange(len(ids)), ids.argmax(-1)]))
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def bench_scratch(batch: int, iters: int) -> list[tuple[str, float]]:
    from clipforge.models import load_model

    px = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1000, 2000, (batch, 32))
    ids[:, -1] = 102
    hf = load_model("scratch:vit-b-32").train()
    compact = CompactClip().train()
    labels = torch.arange(batch)

    def step(model, fwd):
        def run():
            img, txt = fwd()
            logits = 100 * img @ txt.T
            loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = []
    rows.append(
        ("transformers CLIPModel fwd+bwd", batch / timed(step(hf, lambda: hf(px, tokens)[:2]), iters))
    )
    rows.append(("compact own module fwd+bwd", batch / timed(step(compact, lambda: compact(px, ids)), iters)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["images", "captions", "scratch"], action="append")
    p.add_argument("--batch", type=int, default=64, help="batch for images/captions")
    p.add_argument("--train-batch", type=int, default=8, help="batch for the scratch fwd+bwd timing")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    threads = setup_torch_threads(a.threads)
    sections = a.only or ["images", "captions", "scratch"]
    results: dict[str, dict[str, float]] = {}
    for s in sections:
        print(f"[bench_models] {s} ...", file=sys.stderr, flush=True)
        if s == "images":
            rows = bench_images(a.batch, a.iters)
        elif s == "captions":
            rows = bench_captions(a.batch, a.iters)
        else:
            rows = bench_scratch(a.train_batch, a.iters)
        results[s] = {name: round(v, 2) for name, v in rows}
    out = {"threads": threads, "batch": a.batch, "train_batch": a.train_batch, "results": results}
    if a.json:
        emit_json(out)
    else:
        rows = [(s, name, v) for s, d in results.items() for name, v in d.items()]
        print(format_table(rows, ["section", "variant", "samples/s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
