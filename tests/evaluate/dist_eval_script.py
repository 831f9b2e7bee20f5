"""Run by test_eval_distributed.py under 1 process and under torchrun (2 gloo processes).

argv: SHARD_DIR OUT_JSON. Evaluates a tiny seeded model with zero-shot + probe + retrieval on the
colour shards and writes the numbers from rank 0.
"""

from __future__ import annotations

import sys

import torch
from evalutils import TinyClip

from clipforge.evaluate import dist
from clipforge.evaluate.recipes import DatasetSpec
from clipforge.evaluate.runner import evaluate
from clipforge.utils import write_json


def main() -> None:
    shard_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_from_env("gloo")
    model = TinyClip(seed=0).eval()
    spec = DatasetSpec(
        name="colors",
        shards=f"{shard_dir}/color-*.tar",
        classnames=f"{shard_dir}/classnames.txt",
        templates="cifar10",
        tasks=("zeroshot", "probe", "retrieval"),
    )
    report = evaluate(model, [spec], workers=0, batch_size=8, text_batch_size=7, cache=False, progress=False)
    if dist.is_main():
        keep = [{k: r[k] for k in ("task", "metrics", "n_images", "bad_samples")} for r in report["results"]]
        write_json(out, {"world_size": report["settings"]["world_size"], "results": keep})
    dist.barrier()


if __name__ == "__main__":
    main()
