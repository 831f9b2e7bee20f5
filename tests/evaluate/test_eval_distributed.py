"""The same model and data give identical numbers under 1 and 2 processes (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from evalutils import write_color_shards

SCRIPT = Path(__file__).with_name("dist_eval_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def test_one_vs_two_processes(tmp_path: Path) -> None:
    write_color_shards(tmp_path / "shards", n_shards=3, per_shard=20, corrupt=1)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "shards"), str(one)], env=_env(), check=True, timeout=120
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), str(tmp_path / "shards"), str(two)]  # fmt: skip
    subprocess.run(cmd, env=_env(), check=True, timeout=180)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert [r["task"] for r in a["results"]] == ["zeroshot", "probe", "retrieval"]
    assert a["results"][0]["n_images"] == 57 and a["results"][0]["bad_samples"]["total"] == 3
    for ra, rb in zip(a["results"], b["results"]):
        ma = {k: v for k, v in ra["metrics"].items() if k != "fit_seconds"}
        mb = {k: v for k, v in rb["metrics"].items() if k != "fit_seconds"}
        assert ma == mb, ra["task"]
        assert ra["bad_samples"]["counts"] == rb["bad_samples"]["counts"]
