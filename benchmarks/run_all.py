"""Every stage against the tool it replaces, in one run: a Markdown table for the README (issue 16).

    python benchmarks/run_all.py --quick            # small sizes, a few minutes on 2 cores
    python benchmarks/run_all.py --quick --only ingest,onnx --json

Runs each benchmark script that exists with its ``--json`` output and quick flags, one after the other
(never in parallel: they would measure each other), and writes ``runs/bench/README-table.md`` (stage,
clipforge, peer, ratio, command) with the machine, threads, versions, load average and the date; the
same table goes to stdout. A stage whose peer needs a side venv that is missing is skipped with a line
saying which venv and how to make it; a stage that fails is listed with the last line of its error.
Each stage runs under ``--stage-timeout`` seconds. The figures are as noisy as the machine is shared.
``--only ... --merge`` re-runs some stages and keeps the other rows of the earlier table, each marked
with the date and load of the run that measured it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable


@dataclass
class Stage:
    """One benchmark: how to run it (quick / full) and how to read clipforge, peer and ratio from its JSON."""

    name: str
    script: str
    quick: list[str]
    full: list[str]
    read: Callable[[dict], tuple[str, str, str]]
    peer: str
    venv_flag: str | None = None  # flag naming the peer's side-venv python
    venv: str | None = None  # default path of that python
    venv_how: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _g(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def read_ingest(r: dict) -> tuple[str, str, str]:
    cf, i2 = _g(r, "results", "clipforge"), _g(r, "results", "img2dataset")
    agree = "counts agree" if r.get("success_counts_agree") else "COUNTS DIFFER"
    if "sizes_agree" in r:  # a bench_ingest.py that checks the resize URL by URL
        agree += ", sizes agree" if r["sizes_agree"] else f", {r.get('sizes_differ')} SIZES DIFFER"
    mb = "{:.1f} MB"
    return (
        f"{_f(_g(cf, 'samples_per_s'))} URLs/s, {_f(_g(cf, 'cpu_s_per_sample'), '{:.4f}')} CPU s/URL, "
        f"{_f(_mb(_g(cf, 'output_bytes')), mb)}",
        f"{_f(_g(i2, 'samples_per_s'))} URLs/s, {_f(_g(i2, 'cpu_s_per_sample'), '{:.4f}')} CPU s/URL, "
        f"{_f(_mb(_g(i2, 'output_bytes')), mb)}",
        f"{_f(r.get('ratio_samples_per_s'), '{:.2f}x')} ({agree}, {_g(cf, 'written')} of {r.get('n_urls')} "
        f"ok, {r.get('resize', 'longer side 256')})",
    )


def _mb(x: Any) -> float | None:
    return None if x is None else x / 1e6


def read_eval(r: dict) -> tuple[str, str, str]:
    ours, cb = _g(r, "ours_fp32", "seconds"), _g(r, "clip_benchmark", "seconds")
    ratio = r.get("ratio_ours_fp32_over_cb")
    return f"{_f(ours, '{:.1f}')} s fp32", f"{_f(cb, '{:.1f}')} s", f"{_f(ratio, '{:.3f}')} of its time"


def read_train(r: dict) -> tuple[str, str, str]:
    return (
        f"{_f(_g(r, 'clipforge', 'samples_per_s'), '{:.2f}')} samples/s",
        f"{_f(_g(r, 'open_clip', 'samples_per_s'), '{:.2f}')} samples/s",
        _f(r.get("ratio"), "{:.2f}x"),
    )


def read_onnx(r: dict) -> tuple[str, str, str]:
    return (
        f"{_f(_g(r, 'images_per_s', 'onnxruntime'))} images/s (onnxruntime)",
        f"{_f(_g(r, 'images_per_s', 'torch'))} images/s (torch eager)",
        _f(r.get("speedup_onnxruntime_vs_torch"), "{:.2f}x"),
    )


def _serve_cell(s: dict) -> str:
    return (
        f"{_f(s.get('qps'))} QPS, p50 {_f(s.get('p50_ms'))} ms, p99 {_f(s.get('p99_ms'))} ms, "
        f"{s.get('errors', '?')} errors, {_f(s.get('server_cpu_ms_per_req'))} server CPU ms/query"
    )


def read_serve(r: dict) -> tuple[str, str, str]:
    peer = r.get("clip_back")
    s = r.get("search") or r.get(f"search_{(peer or {}).get('vs_clipforge_runtime')}") or {}
    if not isinstance(peer, dict) or not isinstance(peer.get("search"), dict):
        return _serve_cell(s), "not measured (run bench_serve.py with --vs clip-back)", "—"
    ps = peer["search"]
    ratio = _f(s["qps"] / ps["qps"], "{:.2f}x") if ps.get("qps") and s.get("qps") else "—"
    cpu = s.get("server_cpu_ms_per_req"), ps.get("server_cpu_ms_per_req")
    if all(cpu):
        ratio += f" QPS, {cpu[1] / cpu[0]:.1f}x less server CPU per query"
    agree = peer.get("agreement_vs_clipforge") or {}
    if "top10_overlap" in agree:
        ratio += f" (same top-10: {agree['top10_overlap']:.2f} overlap)"
    return _serve_cell(s), _serve_cell(ps), ratio


def read_inference(r: dict) -> tuple[str, str, str]:
    cf, cr = _g(r, "results", "clipforge"), _g(r, "results", "clip-retrieval")
    return (
        f"{_f(_g(cf, 'images_per_s'))} images/s, {_f(_g(cf, 'end_to_end_s'))} s to index",
        f"{_f(_g(cr, 'images_per_s'))} images/s, {_f(_g(cr, 'end_to_end_s'))} s to index",
        f"{_f(r.get('ratio_images_per_s'), '{:.2f}x')} images/s (its loop without model load vs our embed "
        f"with it); {_f(r.get('ratio_end_to_end'), '{:.2f}x')} end-to-end",
    )


def stages() -> list[Stage]:
    return [
        Stage("ingest (URLs -> shards, shortest side 256)", "bench_ingest.py", ["--n", "200", "--threads",
              "16"],
              ["--n", "1000", "--threads", "16"], read_ingest, "img2dataset",
              "--i2d-python", "/tmp/i2d/bin/python",
              "python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset"),
        Stage("bulk inference -> index", "bench_inference.py", ["--limit", "200"], [], read_inference,
              "clip-retrieval", "--cr-python", "/tmp/clip-retrieval/bin/python",
              "see the recipe in bench_inference.py's docstring"),
        Stage("eval (zero-shot + retrieval)", "bench_eval.py", ["--limit", "200"], [], read_eval,
              "CLIP_benchmark", "--cb-python", "/tmp/cb/bin/python",
              "python3 -m venv /tmp/cb && /tmp/cb/bin/pip install clip_benchmark (see bench_eval.py)"),
        Stage("train step (ViT-B/32)", "bench_train.py", ["throughput", "--model", "scratch:vit-b-32",
              "--batch-size", "16", "--steps", "2", "--out", "/tmp/run_all_bench_train.json"],
              ["throughput", "--model", "scratch:vit-b-32", "--batch-size", "32", "--steps", "3"],
              read_train, "open_clip", "--open-clip-python", "/tmp/oc/bin/python",
              "python -m venv /tmp/oc && /tmp/oc/bin/pip install torch open_clip_torch (see bench_train.py)"),
        Stage("serve (text search)", "bench_serve.py", ["--vs", "clip-back", "--max-per-shard", "40",
              "--requests", "300", "--duration", "15", "--classify-requests", "40", "--skip-no-batching",
              "--work", "/tmp/run_all_bench_serve"], ["--vs", "clip-back"], read_serve, "clip-back",
              "--cr-python", "/tmp/clip-retrieval/bin/python",
              "see the recipe in bench_inference.py's docstring"),
        Stage("image embedding (export)", "bench_onnx.py", ["--threads", "2", "--rounds", "3"], [],
              read_onnx, "torch eager (same model)"),
    ]  # fmt: skip


def parse_json(stdout: str) -> dict:
    """The one JSON object a --json run prints (tolerates stray lines before it)."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        lines = stdout.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("{"):
                try:
                    return json.loads("\n".join(lines[i:]))
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object on stdout")


def run_stage(st: Stage, args: argparse.Namespace) -> dict:
    """-> row dict: stage, clipforge, peer, ratio, command, note."""
    script = HERE / st.script
    row = {"stage": st.name, "script": st.script, "peer_tool": st.peer, "clipforge": "—", "peer": "—"}
    row["ratio"] = "—"
    if not script.exists():
        return {**row, "command": "—", "note": f"skipped: {st.script} does not exist yet"}
    argv = st.quick if args.quick else st.full
    if st.venv_flag:
        venv = getattr(args, st.venv_flag.lstrip("-").replace("-", "_"), None) or st.venv
        if not venv or not Path(venv).exists():
            return {
                **row,
                "command": "—",
                "note": f"skipped: no {st.peer} side venv at {venv} ({st.venv_how})",
            }
        argv = [*argv, st.venv_flag, venv]
    cmd = [PY, str(script), *argv, "--json"]
    shown = "python " + shlex.join([f"benchmarks/{st.script}", *argv, "--json"])
    row["command"] = shown
    print(f"[run_all] {st.name}: {shown}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {**row, "note": f"timed out after {args.stage_timeout:.0f} s"}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["?"])[-1]
        return {**row, "note": f"failed (rc {p.returncode}): {last[:200]}"}
    try:
        res = parse_json(p.stdout)
    except ValueError as e:
        return {**row, "note": f"failed: {e}"}
    row["clipforge"], row["peer"], row["ratio"] = st.read(res)
    row["result"] = res
    row["note"] = ""
    return row


def machine() -> dict:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    }
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    info["cpu"] = cpu
    info["cpus_visible"] = os.cpu_count()
    try:
        from clipforge.runtime import available_cpus

        info["cpus_available"] = available_cpus()
    except Exception:  # noqa: BLE001 - an info line, never a failure
        pass
    info["python"] = platform.python_version()
    for mod in ("clipforge", "torch", "onnxruntime", "faiss", "PIL"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "not installed"
    for name, py, dist in (
        ("img2dataset", "/tmp/i2d/bin/python", "img2dataset"),
        ("clip-retrieval", "/tmp/clip-retrieval/bin/python", "clip-retrieval"),
        ("CLIP_benchmark", "/tmp/cb/bin/python", "clip_benchmark"),
        ("open_clip", "/tmp/oc/bin/python", "open_clip_torch"),
    ):
        if Path(py).exists():
            code = f"import importlib.metadata as m; print(m.version({dist!r}))"
            p = subprocess.run([py, "-c", code], capture_output=True, text=True)
            info[name] = p.stdout.strip() or "?"
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def merge_earlier(rows: list[dict], path: Path, order: list[Stage]) -> list[dict]:
    """``rows`` plus the rows of the stages not re-run from an earlier run's JSON (``--merge``), each
    marked with its own date and load; in the order of :func:`stages`."""
    if not path.is_file():
        return rows
    earlier = json.loads(path.read_text())
    when = earlier.get("machine", {})
    done = {r["script"] for r in rows}
    kept = []
    for r in earlier.get("rows", []):
        m = re.search(r"benchmarks/(\S+\.py)", r.get("command", ""))
        script = r.get("script") or (m.group(1) if m else None)
        if script and script not in done:
            r.setdefault("script", script)
            r.setdefault("earlier", f"{when.get('date_utc', '?')} UTC, load {when.get('loadavg', '?')}")
            kept.append(r)
    rank = {st.script: i for i, st in enumerate(order)}
    return sorted([*rows, *kept], key=lambda r: rank.get(r["script"], len(rank)))


def markdown(rows: list[dict], info: dict, threads: str) -> str:
    out = ["| stage | clipforge | peer | ratio | command |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = r["ratio"] if not r.get("note") else f"{r['ratio']} — {r['note']}"
        if r.get("earlier"):
            ratio += f" (earlier run: {r['earlier']})"
        cmd = f"`{r['command']}`" if r["command"] != "—" else "—"
        out.append(f"| {r['stage']} | {r['clipforge']} | {r['peer_tool']}: {r['peer']} | {ratio} | {cmd} |")
    versions = ", ".join(
        f"{k} {v}"
        for k, v in info.items()
        if k not in ("date_utc", "cpu", "cpus_visible", "cpus_available", "loadavg", "loadavg_end")
    )
    out += [
        "",
        f"Measured {info['date_utc']} UTC on {info['cpu']}, {info.get('cpus_available', '?')} usable of "
        f"{info['cpus_visible']} CPUs, {threads}; load average {info['loadavg']} at the start and "
        f"{info.get('loadavg_end', '?')} at the end (other jobs shared the CPUs).",
        f"Versions: {versions}.",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (the default is each script's full run)")
    p.add_argument("--only", default=None, help="comma list of stage name prefixes or script names")
    p.add_argument("--stage-timeout", type=float, default=900.0, help="seconds per stage")
    p.add_argument("--out", default="runs/bench/README-table.md", help="Markdown table path")
    p.add_argument("--i2d-python", default=None, help="img2dataset venv python")
    p.add_argument("--cr-python", default=None, help="clip-retrieval venv python")
    p.add_argument("--cb-python", default=None, help="CLIP_benchmark venv python")
    p.add_argument("--open-clip-python", default=None, help="open_clip venv python")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of stages not run now from the earlier --out JSON (marked with their date)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (table still written)")
    args = p.parse_args()
    chosen = stages()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        chosen = [s for s in chosen if any(s.name.startswith(k) or s.script.startswith(k) for k in keys)]
    info = machine()
    rows = []
    for st in chosen:
        row = run_stage(st, args)
        print(f"[run_all] {st.name}: {row['ratio']} {row.get('note', '')}", file=sys.stderr, flush=True)
        rows.append(row)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    threads = "ingest 16 download threads both tools; torch stages use each script's --threads"
    out = Path(args.out)
    for r in rows:
        r["date_utc"] = info["date_utc"]
    if args.merge:
        rows = merge_earlier(rows, out.with_suffix(".json"), stages())
    table = markdown(rows, info, threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    (out.with_suffix(".json")).write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
    if args.json:
        print(json.dumps({"machine": info, "rows": rows, "table": str(out)}, default=str))
    else:
        print(table)


if __name__ == "__main__":
    main()
