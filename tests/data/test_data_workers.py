"""DataLoader workers over ShardDataset die with their parent (issue 11.13: kill -9 left a 558 MB orphan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_testutils import good_sample, write_tar

SCRIPT = """
import os, sys, time
from torch.utils.data import DataLoader
from clipforge.data.dataset import ShardDataset, collate
from clipforge.data.decode import DecodeConfig

out = sys.argv[1]

def slow(s):  # a worker busy decoding: it never gets back to the DataLoader's own parent check
    open(os.path.join(out, f"w{os.getpid()}"), "w").close()
    time.sleep(120)
    return s

ds = ShardDataset(sys.argv[2:], map_fn=slow, decode=DecodeConfig(image=False))
for _ in DataLoader(ds, num_workers=2, batch_size=1, collate_fn=collate):
    pass
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


def test_workers_die_with_parent(tmp_path: Path) -> None:
    shards = [
        str(write_tar(tmp_path / f"s{i}.tar", [good_sample(f"k{i}{j}") for j in range(3)])) for i in range(2)
    ]
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(marks), *shards])
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        pids = [int(p.name[1:]) for p in marks.iterdir()]
        assert len(pids) == 2, "workers did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in pids if _alive(p)]
        for p in survivors:  # clean up before failing
            os.kill(p, signal.SIGKILL)
        assert not survivors, f"orphaned DataLoader workers {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
