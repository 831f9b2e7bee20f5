"""Result files: what was evaluated (model, shard hashes, templates) beside the numbers; comparison.

A result JSON holds ``{"model": {...}, "results": [{"task", "dataset", "shards", "templates",
"metrics", ...}], ...}``. Two files compare by ``(task, dataset, metric)``; a differing shard hash or
template set is flagged, since then the numbers are not measured on the same thing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clipforge.data.shards import expand_shards, is_remote, shard_name


def shard_fingerprint(shards: str | list[str], contents: bool = False) -> dict[str, Any]:
    """sha256 over shard names + byte sizes (fast), or over full contents with ``contents=True``."""
    urls = expand_shards(shards)
    h = hashlib.sha256()
    files = []
    for u in urls:
        size = None if is_remote(u) else os.path.getsize(u)
        files.append({"name": shard_name(u), "bytes": size})
        h.update(f"{shard_name(u)}\0{size}\0".encode())
        if contents and size is not None:
            with open(u, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
    return {"sha256": h.hexdigest(), "method": "contents" if contents else "names+sizes", "files": files}


def load_result(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read result file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path} is not a clipforge eval result (no 'results' list)")
    return data


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("n_")  # counts
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    """Rows ``[task, dataset, metric, A, B, B - A]`` for metrics in both, and warnings."""
    index_b = {(r["task"], r["dataset"]): r for r in b["results"]}
    rows: list[list[Any]] = []
    warnings: list[str] = []
    for ra in a["results"]:
        key = (ra["task"], ra["dataset"])
        rb = index_b.get(key)
        if rb is None:
            warnings.append(f"{key[0]}/{key[1]} only in A")
            continue
        sa, sb = ra.get("shards", {}).get("sha256"), rb.get("shards", {}).get("sha256")
        if sa and sb and sa != sb:
            warnings.append(f"{key[0]}/{key[1]}: different shards (hash {sa[:12]} vs {sb[:12]})")
        if ra.get("templates") != rb.get("templates"):
            warnings.append(
                f"{key[0]}/{key[1]}: different templates ({ra.get('templates')} vs {rb.get('templates')})"
            )
        ma, mb = _numeric(ra.get("metrics", {})), _numeric(rb.get("metrics", {}))
        for m in ma:
            if m in mb:
                rows.append([key[0], key[1], m, ma[m], mb[m], mb[m] - ma[m]])
    seen = {(r["task"], r["dataset"]) for r in a["results"]}
    warnings += [f"{t}/{d} only in B" for (t, d) in index_b if (t, d) not in seen]
    return rows, warnings
