"""Load test of ``clipforge serve`` from a second process, on loopback only, bounded in count and time.

    python benchmarks/bench_serve.py --json          # all flickr8k (8000) + cifar10 (10000), towers model
    python benchmarks/bench_serve.py --requests 500 --duration 30 --classify-requests 100

1. builds (or reuses) an index of flickr8k + cifar10 images with the model (``--work`` dir; a spec is
   saved there first so that the index and the server use the same weights);
2. starts ``clipforge serve`` as a subprocess on 127.0.0.1 (``--threads`` torch threads);
3. text search: ``--requests`` distinct flickr captions from ``--concurrency`` keep-alive connections
   (asyncio + httpx), stopping early at ``--duration`` s: QPS, p50/p90/p99 latency, errors;
4. malformed requests (empty text, k out of range, garbage image, path traversal, bad JSON, huge
   body...) must all get 4xx, and ``/health`` must still answer afterwards;
5. classify throughput (cifar10 label set, image uploads) with micro-batching on, then again on a
   server started with ``--no-batching``;
6. ``--runtime torch onnx``: steps 3 and 5 (batching on) once per runtime, same index, same run (the
   onnx server exports the model once into ``WORK/onnx-cache``); keys of a non-torch runtime end in
   ``_onnx``. ``--index-build-shard SHARD``: also ``index build`` images/s of one shard per runtime
   (the per-shard embedding time from the manifest; the export made before timing);
7. with ``--captioner DIR``: ``POST /caption`` throughput (captions/s) for greedy and beam-3 on
   flickr8k test images, batching on vs off (``--caption-only`` skips the index and steps 1-5):

    python benchmarks/bench_serve.py --captioner runs/captioner --caption-only --json

8. ``--vs clip-back``: right after our text search phase (our server idle), clip-retrieval's back end
   (``clip_back()`` from the side venv ``--cr-python``, its Flask server as shipped, parquet metadata,
   no mclip/aesthetic/safety) serves the same index -- our ``index.faiss`` file itself as its
   ``image.index``, our uid/caption as its ``metadata/0.parquet`` -- with the same model, plugged into
   all_clip's loader registry as ``clipforge:`` (as in bench_inference.py), the same torch-thread
   rule, on 127.0.0.1. The same load generator sends the same queries (k=10, same concurrency, same
   request cap and duration) to its ``/knn-service``; first 20 queries go to both servers and their
   top-10 keys are compared (same model and vectors: overlap ~1). Reported as ``clip_back``: QPS,
   p50/p99, errors, server CPU ms per query, and ``ratio_qps``. Note: clip-back answers HTTP/1.0
   (a new connection per query) and encodes one query at a time; ours keeps connections alive and
   batches concurrent queries -- both as each tool ships.

Measured 2026-11-30, ONE run, towers model (saved), index of flickr8k test-000000.tar (1000 images),
``--threads 2``, load average 7-9 on the 2 shared cores from other agents (figures noisy):

    python benchmarks/bench_serve.py --data .../flickr8k/test-000000.tar --requests 1000 --duration 30 \
        --classify-requests 150 --skip-no-batching --threads 2 --runtime torch onnx \
        --index-build-shard .../flickr8k/test-000000.tar

    phase                 torch       onnx        onnx/torch
    /search (text) QPS    86.3        134.7       1.56x   (server CPU 7.8 -> 5.4 ms/request)
    /classify req/s       14.8        29.7        2.01x   (server CPU 36.1 -> 19.4 ms/request)
    index build images/s  10.7        26.0        2.43x   (embedding loop of the shard)

``--vs clip-back``, measured 2026-11-30 14:49-14:54 UTC, ONE run each, index of 720 images (flickr8k +
cifar10, ``--max-per-shard 40``), towers model, 1000 queries (k=10, 32 connections, 30 s cap), 2 shared
cores at load average 25-30 from other agents (QPS here is mostly the scheduler's share; the server
CPU per query is the capacity figure):

    python benchmarks/bench_serve.py --vs clip-back [--runtime onnx] --max-per-shard 40 --requests 1000 \
        --duration 30 --classify-requests 20 --skip-no-batching --work /tmp/run_all_bench_serve

    server               QPS    p50 ms   p99 ms   errors  server CPU ms/query
    clipforge (torch)    43.4   360      2679     0       8.6
    clipforge (onnx)     68.3   509      671      0       5.5
    clip-back 2.45.0     22.7   1169     3269     0       33.8   (36.9 in the onnx run)
    same top-10 for 20 of 20 queries; torch: 1.91x QPS, 3.9x less CPU; onnx: 2.96x QPS, 6.7x less CPU

Re-measured on the IDLE machine (load average 0.4-2.9: nothing else running), 2026-11-30 16:09-16:11 UTC,
same index and model, 2000 queries, one run, clip-back measured between our two servers:

    python benchmarks/bench_serve.py --vs clip-back --runtime torch onnx --max-per-shard 40 --requests 2000 \
        --duration 30 --classify-requests 20 --skip-no-batching --work /tmp/run_all_bench_serve --json

    server               QPS    p50 ms   p99 ms   errors  server CPU ms/query
    clipforge (torch)    197.4  156      201      0       7.7
    clipforge (onnx)     265.2  120      149      0       6.0
    clip-back 2.45.0     30.5   1050     1285     0       46.9
    same top-10 for 20 of 20 queries; torch: 6.47x QPS, 6.1x less CPU; onnx: 8.7x QPS, 7.8x less CPU

An earlier run with onnxruntime's default intra-op spinning gave onnx 0.57x torch on search and
1.02x on classify: busy-waiting threads starve the rest of a shared CPU, so the sessions sleep.

The load generator shares the machine with the server: on a 2-core box its own CPU use (a few
hundred microseconds per request) is part of the cost. Figures on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model(args: argparse.Namespace) -> None:
    """Serve and index with the same weights: a spec whose heads are random-initialized would give
    the server different weights than the index builder, so save it once and use the saved dir."""
    if Path(args.model).is_dir():
        return
    saved = Path(args.work) / "model"
    if not (saved / "config.json").is_file():
        from clipforge.models import load_model

        load_model(args.model).save(saved)
        log(f"saved {args.model} to {saved}")
    args.model = str(saved)


def ensure_index(args: argparse.Namespace) -> Path:
    from clipforge.index import BuildOptions, build_index
    from clipforge.utils import setup_torch_threads

    setup_torch_threads(args.threads)
    out = Path(args.work) / "index"
    if (out / "manifest.json").is_file() and not args.rebuild:
        log(f"reusing index {out}")
        return out
    t = time.perf_counter()
    opts = BuildOptions(batch_size=32, workers=1, max_per_shard=args.max_per_shard)
    mf = build_index(args.data, args.model, out, opts, progress=True)
    log(f"built index: {mf['count']} images, {mf['index']['factory']} in {time.perf_counter() - t:.0f}s")
    return out


class Server:
    """``clipforge serve`` in a subprocess on 127.0.0.1; stopped with SIGINT (uvicorn's clean shutdown)."""

    def __init__(
        self, args: argparse.Namespace, index: Path | None, extra: list[str], runtime: str = "torch"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "clipforge.cli", "serve", args.model]
        cmd += ["--index", str(index)] if index is not None else []
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += ["--precision", args.precision]
        env = dict(os.environ)
        if runtime != "torch":
            cmd += ["--runtime", runtime]
            env["CLIPFORGE_CACHE"] = str(Path(args.work) / "onnx-cache")
        log("starting: " + " ".join(cmd[2:]))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not come up in 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


CB_HARNESS = r"""
import json, sys
cfg = json.loads(sys.argv[1])
from clipforge.runtime import setup_torch_threads
setup_torch_threads(cfg["threads"])  # the same torch thread rule as clipforge serve --threads
import all_clip.main as acm


def load_clipforge(spec, use_jit, device, cache_path):  # the served model, through all_clip's registry
    from clipforge import load_model
    from clipforge.evaluate.embed import eval_transform
    model = load_model(spec).eval().to(device)
    return model, eval_transform(model), lambda texts: model.tokenize(texts)["input_ids"]


acm._CLIP_REGISTRY = {"clipforge:": load_clipforge, **acm._CLIP_REGISTRY}
import flask
_run = flask.Flask.run
flask.Flask.run = lambda self, host=None, port=None, **kw: _run(self, "127.0.0.1", port, **kw)  # loopback
from clip_retrieval.clip_back import clip_back
clip_back(indices_paths=cfg["paths"], port=cfg["port"], clip_model="clipforge:" + cfg["model"], use_jit=False,
          enable_mclip_option=False, provide_aesthetic_embeddings=False, columns_to_return=["url", "caption"])
"""


def clip_back_folder(index: Path, work: Path) -> Path:
    """clip-back's index layout from our index: ``image.index`` (our faiss index file itself, so both
    servers search the same vectors with the same index type; IVF gets the direct map clip-back's
    ``search_and_reconstruct`` needs) and ``metadata/0.parquet`` (url = our uid, caption) in row
    order; returns the ``indices_paths.json`` naming it ``bench``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "clip-back" / "bench"
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    ix = faiss.read_index(str(index / "index.faiss"))
    try:
        faiss.extract_index_ivf(ix).make_direct_map()
    except RuntimeError:  # not an IVF index: reconstruct works as is
        pass
    faiss.write_index(ix, str(folder / "image.index"))
    meta = pq.read_table(index / "meta.parquet", columns=["uid", "caption"])
    pq.write_table(
        pa.table({"url": meta.column("uid"), "caption": meta.column("caption")}),
        folder / "metadata" / "0.parquet",
    )
    paths = work / "clip-back" / "indices_paths.json"
    paths.write_text(json.dumps({"bench": str(folder)}))
    return paths


class ClipBack:
    """``clip-retrieval back`` (clip_back(), its Flask server as shipped) in the side venv, serving our
    index with our model (plugged into all_clip as a ``clipforge:`` loader), on 127.0.0.1."""

    def __init__(self, args: argparse.Namespace, index: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import torchvision_stub

        work = Path(args.work)
        stubs = torchvision_stub.write_package(
            work / "stubs", (*torchvision_stub.TORCHVISION, "sentence_transformers", "wandb")
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {"paths": str(clip_back_folder(index, work)), "port": self.port, "model": args.model}
        cfg["threads"] = args.threads
        env = {
            **os.environ,
            "PYTHONPATH": str(stubs),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        env["NO_ALBUMENTATIONS_UPDATE"] = "1"
        self.log = open(work / "clip-back.log", "w")
        log(f"starting clip-back ({args.cr_python}), log {work / 'clip-back.log'}")
        self.proc = subprocess.Popen(
            [args.cr_python, "-c", CB_HARNESS, json.dumps(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"clip-back exited with code {self.proc.returncode}; see {work / 'clip-back.log'}"
                )
            try:
                if httpx.get(self.url + "/indices-list", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("clip-back did not come up in 300 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def clip_back_search(q: str, k: int = 10) -> tuple[str, dict, bytes]:
    """The same text query to clip-back's /knn-service: k nearest images, no dedup/safety/aesthetic."""
    body = {"text": q, "modality": "image", "num_images": k, "indice_name": "bench", "deduplicate": False}
    return "/knn-service", body, b'"id"'


def top_k_agreement(ours: str, theirs: str, queries: list[str], k: int = 10) -> dict:
    """Same queries to both servers: mean top-k overlap of the returned image keys and top-1 equality
    (both should be ~1: the same model and vectors; float noise may swap near-ties)."""
    overlap, top1 = [], []
    with httpx.Client(timeout=60) as c:
        for q in queries:
            a = [r["uid"] for r in c.post(ours + "/search", json={"text": q, "k": k}).json()["results"]]
            path, body, _ = clip_back_search(q, k)
            b = [r["url"] for r in c.post(theirs + path, json=body).json()]
            overlap.append(len(set(a) & set(b)) / k)
            top1.append(a[:1] == b[:1])
    return {
        "queries": len(queries),
        f"top{k}_overlap": round(sum(overlap) / len(overlap), 4),
        "top1_same": round(sum(top1) / len(top1), 4),
    }


def clip_back_phase(args: argparse.Namespace, index: Path, queries: list[str], ours_url: str | None) -> dict:
    """Text search load on clip-back, same queries, k, concurrency and load generator as ours."""
    srv = ClipBack(args, index)
    try:
        out: dict = {}
        if ours_url:
            out["agreement_vs_clipforge"] = top_k_agreement(ours_url, srv.url, queries[:20])
            log(f"clip-back vs clipforge results: {out['agreement_vs_clipforge']}")
        asyncio.run(run_raw_search(srv.url, queries, 64, 8, 30, clip_back_search))  # warm-up
        out["search"] = measured(
            srv,
            lambda: asyncio.run(
                run_raw_search(
                    srv.url, queries, args.requests, args.concurrency, args.duration, clip_back_search
                )
            ),
        )
        log(f"search (clip-back): {out['search']}")
        return out
    finally:
        srv.stop()


def index_build_rates(args: argparse.Namespace) -> dict:
    """``index build`` of one shard per runtime: images/s of the embedding loop (model load and the
    one-time onnx export are outside the timing: the export is made into the cache first)."""
    import shutil

    from clipforge.export.runtime import load_runtime
    from clipforge.index import BuildOptions, build_index

    os.environ["CLIPFORGE_CACHE"] = str(Path(args.work) / "onnx-cache")
    out = {}
    for rt in args.runtime:
        if rt != "torch":
            load_runtime(args.model, rt, args.threads)  # export once (cached), not timed
        d = Path(args.work) / f"build-{rt}"
        shutil.rmtree(d, ignore_errors=True)
        opts = BuildOptions(batch_size=32, workers=1, runtime=rt, max_per_shard=args.max_per_shard)
        mf = build_index([args.index_build_shard], args.model, d, opts, progress=False, threads=args.threads)
        sec = sum(s["seconds"] for s in mf["shards"])
        out[rt] = {
            "images": mf["count"],
            "embed_s": round(sec, 2),
            "images_per_s": round(mf["count"] / sec, 2),
        }
        log(f"index build ({rt}): {out[rt]}")
    if "torch" in out and "onnx" in out:
        out["onnx_vs_torch"] = round(out["onnx"]["images_per_s"] / out["torch"]["images_per_s"], 2)
    return out


def proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RawConn:
    """Minimal keep-alive HTTP/1.1 client for JSON POSTs: ~10x less client CPU per request than httpx,
    which matters when the load generator shares 2 cores with the server it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, obj: object) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(obj).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            (int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), None
        )
        if length is None:
            raise RuntimeError("response without Content-Length")
        data = await self.reader.readexactly(length)
        keep = [h.lower() for h in lines[1:] if h.lower().startswith("connection:")]
        http10 = lines[0].startswith("HTTP/1.0") and "connection: keep-alive" not in keep
        if http10 or "connection: close" in keep:  # clip-back (werkzeug) answers HTTP/1.0, no keep-alive
            self.writer.close()
            self.writer = None
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def clipforge_search(q: str, k: int = 10) -> tuple[str, dict, bytes]:
    """(path, JSON body, marker of a good answer) of one ``clipforge serve`` text search."""
    return "/search", {"text": q, "k": k}, b'"results"'


async def run_raw_search(
    url: str, queries: list[str], n: int, concurrency: int, duration: float, request=clipforge_search
) -> dict:
    """Text search load with RawConn workers; same report as run_load. ``request(query)`` gives the
    path, body and the bytes a good answer contains (so one load generator drives both servers)."""
    host, port = url.split("//", 1)[1].split(":")
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    counter = iter(range(n))
    t0 = time.perf_counter()
    stop_at = t0 + duration

    async def worker() -> None:
        conn = RawConn(host, int(port))
        try:
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                t = time.perf_counter()
                try:
                    path, payload, good = request(queries[i])
                    status, body = await conn.post_json(path, payload)
                    codes[status] = codes.get(status, 0) + 1
                    if status != 200 or good not in body:
                        errors.append(f"{status}: {body[:120]!r}")
                except (OSError, RuntimeError, asyncio.IncompleteReadError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = RawConn(host, int(port))
                lat.append((time.perf_counter() - t) * 1000)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return _summary(lat, codes, errors, wall)


def _summary(lat: list[float], codes: dict[int, int], errors: list[str], wall: float) -> dict:
    done = len(lat)
    return {
        "requests": done,
        "seconds": round(wall, 3),
        "qps": round(done / wall, 1) if wall else 0.0,
        "p50_ms": round(pct(lat, 50), 2),
        "p90_ms": round(pct(lat, 90), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "errors": len(errors),
        "status": codes,
        "first_errors": errors[:5],
    }


def measured(srv: Server, phase) -> dict:
    """Run ``phase()`` (returns a load summary) and add server/client CPU ms per request."""
    s0, c0 = proc_cpu_s(srv.proc.pid), self_cpu_s()
    res = phase()
    s1, c1 = proc_cpu_s(srv.proc.pid), self_cpu_s()
    n = max(1, res["requests"])
    res["server_cpu_ms_per_req"] = round((s1 - s0) * 1000 / n, 3)
    res["client_cpu_ms_per_req"] = round((c1 - c0) * 1000 / n, 3)
    total = res["server_cpu_ms_per_req"] + res["client_cpu_ms_per_req"]
    # what 2 idle cores could sustain if all of them went to this work (server + load generator)
    res["cpu_bound_qps_2_cores"] = round(2000 / total, 1) if total else None
    return res


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def run_load(url: str, make_request, n: int, concurrency: int, duration: float) -> dict:
    """``n`` requests (or until ``duration`` s) from ``concurrency`` workers; latencies in ms."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        stop_at = t0 + duration

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                t = time.perf_counter()
                try:
                    r = await make_request(client, i)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:120]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                lat.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return _summary(lat, codes, errors, wall)


def captions(index: Path, n: int, seed: int = 0) -> list[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(index / "meta.parquet", columns=["captions", "caption"])
    caps = [c for cs in t.column("captions").to_pylist() if cs for c in cs]
    caps += [c for c in t.column("caption").to_pylist() if c]
    caps = sorted(set(caps))
    random.Random(seed).shuffle(caps)
    if not caps:
        caps = ["a photo of a dog", "a cat on a sofa", "a red car"]
    return [caps[i % len(caps)] for i in range(n)]


def precision_agreement(args: argparse.Namespace, index: Path, queries: list[str], k: int = 10) -> dict:
    """What ``--precision`` costs in results: top-k overlap of the same text queries run at the
    requested precision vs fp32, over the whole index (exact search), and the embeddings' cosine."""
    import numpy as np

    from clipforge.index.store import ClipIndex
    from clipforge.models import load_model
    from clipforge.models.encode import embed_texts, resolve_precision

    model = load_model(args.model).eval()
    prec = resolve_precision(model, args.precision)
    idx = ClipIndex.load(index)
    ref = embed_texts(model, queries, 8)  # the server's text chunk
    low = embed_texts(model, queries, 8, prec)
    a, b = idx.search(ref, k), idx.search(low, k)
    overlap = [len({h.row for h in x} & {h.row for h in y}) / k for x, y in zip(a, b)]
    cos = (ref * low).sum(1)
    return {
        "precision": prec,
        "queries": len(queries),
        f"top{k}_overlap_vs_fp32": round(float(np.mean(overlap)), 4),
        "top1_same": round(float(np.mean([x[0].row == y[0].row for x, y in zip(a, b)])), 4),
        "min_cosine_vs_fp32": round(float(cos.min()), 6),
    }


def sample_images(shards: list[str], n: int) -> list[tuple[str, bytes]]:
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.shards import expand_shards

    out = []
    for url in expand_shards(shards):
        for s in iter_tar_samples(url):
            ext = next((e for e in ("jpg", "png", "jpeg") if e in s), None)
            if ext:
                out.append((f"{s['__key__']}.{ext}", s[ext]))
            if len(out) >= n:
                return out
    return out


async def malformed(url: str) -> dict:
    """Every request here must get a 4xx JSON error; the server must stay up."""
    big = b"0" * (11 << 20)
    cases = [
        ("POST", "/search", {"json": {"text": "", "k": 10}}),
        ("POST", "/search", {"json": {"text": "dog", "k": 0}}),
        ("POST", "/search", {"json": {"text": "dog", "k": 100000}}),
        ("POST", "/search", {"json": {"text": "dog", "filters": {"nocolumn": 1}}}),
        ("POST", "/search", {"content": b"{broken", "headers": {"content-type": "application/json"}}),
        ("POST", "/embed/text", {"json": {"texts": []}}),
        ("POST", "/embed/image", {"files": {"file": ("x.jpg", b"definitely not a jpeg")}}),
        ("POST", "/embed/image", {"files": {"file": ("x.jpg", big)}}),
        ("POST", "/classify", {"files": {"file": ("x.jpg", b"GIF89a")}, "data": {"labels": "a,b"}}),
        ("POST", "/classify", {"files": {"file": ("x.jpg", b"\xff\xd8\xff")}, "data": {"label_set": "nope"}}),
        ("POST", "/search", {"json": {"text": "dog", "filters": {"label": 10**30}}}),
        *[
            (
                "POST",
                "/classify",
                {"files": {"file": ("x.jpg", b"\xff\xd8\xff")}, "data": {"labels": "a,b", "templates": t}},
            )
            for t in ("{}{0}", "{{}}{x}", "{{}}{0[99]}", "{} {:d}", "{{}}{!z}", "{{}}{:>20000000}")
        ],
        ("GET", "/images/..%2F..%2Fetc%2Fpasswd", {}),
        ("GET", "/images/no-such-key", {}),
        ("DELETE", "/search", {}),
    ]
    codes: dict[str, int] = {}
    bad: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for _ in range(3):
            for method, path, kw in cases:
                req = c.build_request(method, httpx.URL(url + path) if "%2F" in path else path, **kw)
                r = await c.send(req)
                codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
                if not 400 <= r.status_code < 500 or "error" not in r.json():
                    bad.append(f"{method} {path} -> {r.status_code}")
            r = await c.post("/embed/text", content=_chunks(12), headers={"content-type": "application/json"})
            if r.status_code != 413:  # a chunked body (no Content-Length) over the 10 MiB limit
                bad.append(f"POST /embed/text 12 MiB chunked -> {r.status_code}")
        healthy = (await c.get("/health")).status_code == 200
    return {"requests": 3 * (len(cases) + 1), "status": codes, "not_4xx": bad, "healthy_after": healthy}


async def _chunks(mib: int):
    for _ in range(mib):
        yield b"0" * (1 << 20)


def caption_phases(args: argparse.Namespace) -> dict:
    """captions/s of greedy and beam-3 over HTTP, micro-batching on vs off (same images, same requests)."""
    test = [str(DATA / "flickr8k" / "test-*.tar")]
    images = sample_images(test, max(8, args.caption_requests))
    out: dict = {"captioner": args.captioner, "images": len(images)}
    strategies = {"greedy": {"strategy": "greedy"}, "beam3": {"strategy": "beam", "beam_width": "3"}}
    for batching in ("batched", "unbatched"):
        extra = ["--captioner", args.captioner] + (["--no-batching"] if batching == "unbatched" else [])
        srv = Server(args, None, extra)
        try:
            for name, opts in strategies.items():

                def req(c: httpx.AsyncClient, i: int, opts=opts):
                    fname, data = images[i % len(images)]
                    return c.post("/caption", files={"file": (fname, data)}, data=opts)

                asyncio.run(run_load(srv.url, req, 4, 2, 60))  # warm-up
                res = measured(
                    srv,
                    lambda req=req, srv=srv: asyncio.run(
                        run_load(srv.url, req, args.caption_requests, args.caption_concurrency, args.duration)
                    ),
                )
                res["captions_per_s"] = res.pop("qps")
                out[f"{name}_{batching}"] = res
                log(f"caption {name} ({batching}): {res}")
            out[f"stats_{batching}"] = httpx.get(srv.url + "/health").json()["stats"]["caption"]
        finally:
            srv.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument(
        "--data",
        nargs="+",
        default=[str(DATA / "flickr8k" / "*.tar"), str(DATA / "cifar10" / "*.tar")],
    )
    p.add_argument("--max-per-shard", type=int, default=None)
    p.add_argument("--work", default="/tmp/clipforge-bench-serve", help="index + results dir (not the repo)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--requests", type=int, default=2000, help="text search requests (upper bound)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="time cap per load phase (s)")
    p.add_argument("--classify-requests", type=int, default=200)
    p.add_argument("--classify-concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="server --precision")
    p.add_argument("--skip-no-batching", action="store_true")
    p.add_argument(
        "--runtime", nargs="+", default=["torch"], choices=["torch", "onnx"],
        help="server runtime(s): the search and classify phases run once per runtime, in this order",
    )  # fmt: skip
    p.add_argument(
        "--index-build-shard", default=None, help="also: index build images/s of this shard per runtime"
    )
    p.add_argument("--captioner", default=None, help="captioner dir: also measure POST /caption")
    p.add_argument("--caption-only", action="store_true", help="with --captioner: only the caption phases")
    p.add_argument("--caption-requests", type=int, default=64, help="requests per caption phase")
    p.add_argument("--caption-concurrency", type=int, default=16)
    p.add_argument(
        "--vs", choices=["clip-back"], default=None,
        help="also: clip-retrieval's back end serving the same index and model, same text search load",
    )  # fmt: skip
    p.add_argument("--cr-python", default="/tmp/clip-retrieval/bin/python", help="clip-retrieval venv python")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.vs and not Path(args.cr_python).exists():
        p.error(f"no clip-retrieval venv at {args.cr_python} (see bench_inference.py's docstring)")

    from clipforge.utils import emit_json, format_table, write_json

    if args.caption_only:
        if not args.captioner:
            p.error("--caption-only needs --captioner DIR")
        results = {"model": args.model, "caption": caption_phases(args)}
        results["cpu_count"] = os.cpu_count()
        results["loadavg_after"] = os.getloadavg()
        write_json(Path(args.work) / "bench_serve_caption.json", results)
        if args.json:
            emit_json(results)
        else:
            print(caption_table(results["caption"]))
        return (
            0
            if all(v.get("errors", 0) == 0 for v in results["caption"].values() if isinstance(v, dict))
            else 1
        )
    ensure_model(args)
    index = ensure_index(args)
    queries = captions(index, args.requests)
    images = sample_images(args.data, 64)
    results: dict = {"model": args.model, "index": json.loads((index / "manifest.json").read_text())["count"]}
    if args.precision != "fp32":
        results["precision_agreement"] = precision_agreement(args, index, queries[:500])
        log(f"precision: {results['precision_agreement']}")

    def classify_req(c: httpx.AsyncClient, i: int):
        name, data = images[i % len(images)]
        return c.post("/classify", files={"file": (name, data)}, data={"label_set": "cifar10", "top_k": "3"})

    async def classify_phase(url: str) -> dict:
        await classify_req(httpx.AsyncClient(base_url=url, timeout=120), 0)  # warm the label cache
        return await run_load(
            url, classify_req, args.classify_requests, args.classify_concurrency, args.duration
        )

    for n_rt, rt in enumerate(args.runtime):
        sfx = "" if rt == "torch" else f"_{rt}"
        srv = Server(args, index, [], runtime=rt)
        try:
            asyncio.run(run_raw_search(srv.url, queries, 64, 8, 30))  # warm-up
            results["search" + sfx] = measured(
                srv,
                lambda srv=srv: asyncio.run(
                    run_raw_search(srv.url, queries, args.requests, args.concurrency, args.duration)
                ),
            )
            log(f"search ({rt}): {results['search' + sfx]}")
            if args.vs == "clip-back" and n_rt == 0:  # right after ours, our server idle but up
                cb = results["clip_back"] = clip_back_phase(args, index, queries, srv.url)
                ours, theirs = results["search" + sfx], cb["search"]
                cb["vs_clipforge_runtime"] = rt
                cb["ratio_qps"] = round(ours["qps"] / theirs["qps"], 2) if theirs["qps"] else None
                cpu = ours["server_cpu_ms_per_req"], theirs["server_cpu_ms_per_req"]
                cb["ratio_server_cpu_per_query"] = round(cpu[1] / cpu[0], 2) if cpu[0] else None
            if n_rt == 0:
                results["malformed"] = asyncio.run(malformed(srv.url))
                log(f"malformed: {results['malformed']}")
            results["classify_batched" + sfx] = measured(
                srv, lambda srv=srv: asyncio.run(classify_phase(srv.url))
            )
            log(f"classify (batching on, {rt}): {results['classify_batched' + sfx]}")
            results["server_stats" + sfx] = httpx.get(srv.url + "/health").json()["stats"]
        finally:
            srv.stop()
    if args.index_build_shard:
        results["index_build"] = index_build_rates(args)
    if not args.skip_no_batching:
        srv = Server(args, index, ["--no-batching"])
        try:
            results["classify_unbatched"] = measured(srv, lambda: asyncio.run(classify_phase(srv.url)))
            log(f"classify (batching off): {results['classify_unbatched']}")
            asyncio.run(run_raw_search(srv.url, queries, 32, 8, 30))
            n = min(args.requests, 1000)
            results["search_unbatched"] = measured(
                srv, lambda: asyncio.run(run_raw_search(srv.url, queries, n, args.concurrency, args.duration))
            )
            log(f"search (batching off): {results['search_unbatched']}")
        finally:
            srv.stop()
    if args.captioner:
        results["caption"] = caption_phases(args)
    results["cpu_count"] = os.cpu_count()
    results["loadavg_after"] = os.getloadavg()
    write_json(Path(args.work) / "bench_serve.json", results)
    if args.json:
        emit_json(results)
    else:
        rows = []
        phases = ("search", "search_onnx", "search_unbatched", "classify_batched", "classify_batched_onnx")
        for k in (*phases, "classify_unbatched", "clip_back"):
            if k in results:
                r = results[k] if k != "clip_back" else results[k]["search"]
                rows.append(
                    [
                        k,
                        r["requests"],
                        r["qps"],
                        r["p50_ms"],
                        r["p99_ms"],
                        r["errors"],
                        r["server_cpu_ms_per_req"],
                        r["client_cpu_ms_per_req"],
                        r["cpu_bound_qps_2_cores"],
                    ]
                )
        heads = [
            "phase",
            "requests",
            "qps",
            "p50_ms",
            "p99_ms",
            "errors",
            "srv_cpu_ms",
            "cli_cpu_ms",
            "cpu_bound_qps",
        ]
        print(format_table(rows, heads))
        m = results["malformed"]
        if "clip_back" in results:
            cb = results["clip_back"]
            print(f"clipforge ({cb['vs_clipforge_runtime']}) / clip-back search QPS: {cb['ratio_qps']}x "
                  f"(target >= 5x); server CPU per query: {cb['ratio_server_cpu_per_query']}x less; "
                  f"results agree: {cb.get('agreement_vs_clipforge')}")  # fmt: skip
        if "index_build" in results:
            print(f"index build: {results['index_build']}")
        if "precision_agreement" in results:
            print(f"precision vs fp32: {results['precision_agreement']}")
        print(f"malformed: {m['requests']} requests -> {m['status']}, healthy after: {m['healthy_after']}")
        if "caption" in results:
            print(caption_table(results["caption"]))
    ok = (
        all(v["errors"] == 0 for k, v in results.items() if k.startswith("search"))
        and not results["malformed"]["not_4xx"]
        and results["malformed"]["healthy_after"]
    )
    return 0 if ok else 1


def caption_table(res: dict) -> str:
    from clipforge.utils import format_table

    rows = []
    for k, r in res.items():
        if isinstance(r, dict) and "captions_per_s" in r:
            rows.append([k, r["requests"], r["captions_per_s"], r["p50_ms"], r["p99_ms"], r["errors"],
                         r["server_cpu_ms_per_req"]])  # fmt: skip
    return format_table(rows, ["phase", "requests", "captions/s", "p50_ms", "p99_ms", "errors", "srv_cpu_ms"])


if __name__ == "__main__":
    sys.exit(main())
