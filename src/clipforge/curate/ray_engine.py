"""The Ray Data engine: the same stage functions, run by an actor pool over shards.

Design: a Ray Dataset of shard URLs goes through ``map_batches`` with a callable class
(:class:`ShardScorer`), so Ray runs an **actor pool**: each actor builds its Context once (loading the
model once per CPU/GPU slot, as the issue asks) and scores whole shards with the very
:func:`~clipforge.curate.shard.process_shard` the local engine uses, writing the same per-shard
Parquet (atomic, so resume works the same). Shards are the unit of work because per-shard outputs are
what makes runs resumable and keeps each worker's memory bounded; global stages (dedup, balance) run
on the driver afterwards, on the merged table. Works on a local instance (``ray.init(num_cpus=N)``)
or a cluster (``--ray-address``; the output dir must then be on storage every node sees).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from clipforge.curate.config import CurateConfig
from clipforge.curate.registry import Stage

log = logging.getLogger(__name__)


class ShardScorer:
    """Ray actor: holds a Context (model loaded once) and scores the shard URLs of each batch."""

    def __init__(
        self,
        config: dict[str, Any],
        stage_names: list[str],
        out_dir: str,
        model: Any = None,
        threads: int = 1,
    ) -> None:
        from clipforge.curate.context import EngineContext
        from clipforge.curate.plan import resolve_stages
        from clipforge.runtime import setup_process

        setup_process(max(1, threads))  # allocator tuning + torch threads, as in the CLI process
        self.ctx = EngineContext(CurateConfig.from_dict(config), model)  # honours config.runtime
        self.stages = [s for s in resolve_stages(stage_names) if s.kind == "sample"]
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import json

        from clipforge.curate.shard import process_shard

        urls, status, rows, bad = [], [], [], []
        for url in batch["url"]:
            r = process_shard(str(url), self.stages, self.ctx, self.out_dir)
            urls.append(r["url"])
            status.append(r["status"])
            rows.append(r["rows"])
            bad.append(json.dumps(r.get("bad") or {}))
        return {"url": urls, "status": status, "rows": rows, "bad": bad}


def run_ray(
    urls: list[str],
    stages: list[Stage],
    config: CurateConfig,
    out_dir: Path,
    *,
    workers: int = 2,
    model: Any = None,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Score shards on Ray (an existing ``ray.init`` is reused; else local with ``workers`` CPUs)."""
    import json

    try:
        import ray
    except ImportError:
        raise SystemExit('the Ray engine needs Ray: pip install "ray[data]"  (or clipforge[ray])') from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    n_actors = max(1, min(len(urls), int(ray.available_resources().get("CPU", workers)) or 1))
    ctx_kwargs = {
        "config": config.to_dict(),
        "stage_names": [s.name for s in stages],
        "out_dir": str(Path(out_dir).resolve()),
        "model": model,
        "threads": 1,
    }
    ds = ray.data.from_items([{"url": u} for u in urls], override_num_blocks=max(1, len(urls)))
    ds = ds.map_batches(
        ShardScorer,
        fn_constructor_kwargs=ctx_kwargs,
        batch_size=1,
        concurrency=n_actors,
        num_cpus=1,
        batch_format="default",
    )
    rows = ds.take_all()
    out = [
        {"url": r["url"], "status": r["status"], "rows": int(r["rows"]), "bad": json.loads(r["bad"])}
        for r in rows
    ]
    order = {u: i for i, u in enumerate(urls)}
    return sorted(out, key=lambda r: order[r["url"]])
