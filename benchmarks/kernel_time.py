"""Kernel share of CPU time per command, allocator tuning off vs on, in one run.

    python benchmarks/kernel_time.py --json                  # eval, index build, curate, serve
    python benchmarks/kernel_time.py --only eval --limit 2    # one command, 2 CIFAR shards
    python benchmarks/kernel_time.py --only quickstart --before-src /tmp/old/src   # old code vs this
    python benchmarks/kernel_time.py --only quickstart --runs after               # this code only

Why: ``/usr/bin/time -v`` on our eval showed half its CPU time in the kernel, from page faults of
large tensors that glibc hands back to the OS after every forward pass (see clipforge/runtime.py).
Each command runs twice under ``/usr/bin/time -v``: "before" and "after" (this checkout, allocator
tuned, inherited by every child process through the environment). "before" is ``CLIPFORGE_MALLOC=0``
(glibc defaults, as before the allocator fix), or with ``--before-src DIR`` an older source tree (e.g.
``git archive <rev> src | tar -x -C /tmp/old``) run with its own defaults. Reported: wall, user,
system seconds, kernel share of CPU, minor page faults, peak RSS (children included). Target: kernel
< 10% of CPU time for every command. The load average is printed: these machines are shared, so the
kernel share and the fault counts are the robust figures, not the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL = "towers:efficientnet-lite0+minilm-l6"


def log(msg: str) -> None:
    print(f"[kernel_time] {msg}", file=sys.stderr, flush=True)


def parse_time_v(text: str) -> dict[str, float]:
    """The figures we need from GNU time's ``-v`` report."""

    def grab(label: str) -> float:
        m = re.search(rf"{re.escape(label)}: (.+)", text)
        if not m:
            return float("nan")
        v = m.group(1).strip()
        if ":" in v:  # h:mm:ss or m:ss.ss
            parts = [float(p) for p in v.split(":")]
            return sum(p * 60**i for i, p in enumerate(reversed(parts)))
        return float(v)

    user, sys_ = grab("User time (seconds)"), grab("System time (seconds)")
    return {
        "wall_s": grab("Elapsed (wall clock) time (h:mm:ss or m:ss)"),
        "user_s": user,
        "sys_s": sys_,
        "kernel_share": sys_ / max(user + sys_, 1e-9),
        "minor_faults": grab("Minor (reclaiming a frame) page faults"),
        "peak_rss_mb": grab("Maximum resident set size (kbytes)") / 1024,
    }


def timed(cmd: list[str], env: dict[str, str], stdin_done=None) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v`` (children included) and parse its report."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-v", "-o", tf.name, *cmd]
        if stdin_done is None:
            subprocess.run(full, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            proc = subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                stdin_done()
            finally:
                proc.send_signal(signal.SIGINT)  # GNU time forwards nothing: signal the server itself
                _interrupt_children(proc.pid)
                proc.wait(timeout=60)
        return parse_time_v(Path(tf.name).read_text())


def _interrupt_children(pid: int) -> None:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in out:
        try:
            os.kill(int(child), signal.SIGINT)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_load(port: int, n: int) -> None:
    """Wait for the server, then ``n`` text searches and n/10 label classifications (sequential)."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    caps = [f"a dog number {i} runs on the grass" for i in range(n)]
    with httpx.Client(timeout=30) as c:
        for q in caps:
            c.post(f"{url}/search", json={"text": q, "k": 10}).raise_for_status()


def commands(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    cifar = str(DATA / "cifar10" / f"test-{{000000..{args.limit - 1:06d}}}.tar")
    flickr = str(DATA / "flickr8k" / "test-000000.tar")
    cf = [sys.executable, "-m", "clipforge.cli"]
    return {
        "eval": {
            "cmd": lambda tag: [
                *cf,
                "eval",
                "zeroshot",
                "--model",
                MODEL,
                "--shards",
                cifar,
                "--classnames",
                str(DATA / "cifar10" / "classnames.txt"),
                "--workers",
                "0",
                "--no-cache",
                "--output",
                str(work / f"eval-{tag}"),
            ],
        },
        "index": {
            "cmd": lambda tag: [
                *cf,
                "index",
                "build",
                "--data",
                flickr,
                "--model",
                MODEL,
                "--output",
                str(work / f"index-{tag}"),
                "--overwrite",
            ],
        },
        "curate": {
            "cmd": lambda tag: [
                *cf,
                "curate",
                "run",
                "--data",
                flickr,
                "--model",
                MODEL,
                "--stages",
                "text",
                "image",
                "clip-score",
                "--output",
                str(work / f"curate-{tag}"),
                "--overwrite",
            ],
        },
        "serve": {
            "needs": "index",
            "cmd": lambda tag: [*cf, "serve", "--index", str(work / f"index-{tag}"), "--port", "{port}"],
        },
        "quickstart": {  # feature pass (6,000 train images), head training, flickr8k + CIFAR-10 eval
            "cmd": lambda tag: [
                *cf,
                "quickstart",
                "--output",
                str(work / f"quickstart-{tag}"),
                "--json",
                *(["--epochs", str(args.qs_epochs)] if args.qs_epochs is not None else []),
            ],
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["eval", "index", "curate", "serve", "quickstart"])
    p.add_argument("--runs", nargs="+", choices=["before", "after"], default=["before", "after"])
    p.add_argument("--before-src", default=None, help="'before' runs this source tree (PYTHONPATH)")
    p.add_argument("--qs-epochs", type=float, default=None, help="quickstart epochs (default: the recipe's)")
    p.add_argument("--limit", type=int, default=2, help="CIFAR-10 shards (1000 images each) for eval")
    p.add_argument("--requests", type=int, default=300, help="text searches sent to the server")
    p.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kernel_time."))
    cmds = commands(args, work)
    names = args.only or [n for n in cmds if n != "quickstart"]
    if "serve" in names and "index" not in names:
        names = ["index", *names]
    results: dict[str, dict] = {}
    for name in names:
        for tag in args.runs:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            env["CLIPFORGE_MALLOC"] = "0" if tag == "before" and not args.before_src else "1"
            if tag == "before" and args.before_src:
                env["PYTHONPATH"] = str(Path(args.before_src).resolve())
            load0 = os.getloadavg()[0]
            cmd = cmds[name]["cmd"](tag)
            log(f"{name} [{tag}] load {load0:.2f}: {' '.join(cmd[3:])}")
            if name == "serve":
                port = free_port()
                cmd = [c.replace("{port}", str(port)) for c in cmd]
                r = timed(cmd, env, stdin_done=lambda port=port: serve_load(port, args.requests))
            else:
                r = timed(cmd, env)
            r["load_avg_1m_at_start"] = load0
            report = work / f"quickstart-{tag}" / "report.json"
            if name == "quickstart" and report.exists():  # same metrics before and after: behaviour unchanged
                r["metrics"] = json.loads(report.read_text())["metrics"]
            results[f"{name}/{tag}"] = r
            log(f"  {json.dumps(r)}")
    rows = []
    for name in names:
        a = results.get(f"{name}/after") or results[f"{name}/before"]
        b = results.get(f"{name}/before") or a
        rows.append(
            [
                name,
                f"{b['wall_s']:.1f} -> {a['wall_s']:.1f}",
                f"{b['sys_s']:.1f} -> {a['sys_s']:.1f}",
                f"{b['kernel_share']:.0%} -> {a['kernel_share']:.0%}",
                f"{b['minor_faults'] / 1e6:.2f}M -> {a['minor_faults'] / 1e6:.2f}M",
                f"{b['peak_rss_mb']:.0f} -> {a['peak_rss_mb']:.0f}",
            ]
        )
    out = {"results": results, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
           "before": f"source {args.before_src}" if args.before_src else "CLIPFORGE_MALLOC=0 (glibc defaults)"}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        from clipforge.utils import format_table

        print(
            format_table(
                rows, ["command", "wall s", "kernel s", "kernel share", "minor faults", "peak RSS MB"]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
