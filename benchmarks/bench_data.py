"""Data-layer benchmark: decode + resize + center-crop throughput, and shard read throughput.

1. images/s for decode -> resize shorter side -> center crop 224, ours (JPEG draft mode, one resize,
   no extra copies) vs plain Pillow (full decode, convert, resize, crop), on 1 and 2 processes, on
   (a) the flickr8k shards as they are (224x224 JPEGs: draft mode cannot help) and (b) the same photos
   upscaled to 800x600 JPEGs written to a temp shard (typical web image size: draft decodes at 1/2).
2. shard read MB/s: our reader (iter_tar_samples) vs raw ``tarfile`` iteration vs the ``webdataset``
   package's tar iterator, over the flickr8k train shards (page cache warmed first).

    python benchmarks/bench_data.py [--images 1000] [--procs 1,2] [--json]

3. ``--decode-memory``: peak RSS of ``clipforge data ingest`` over a folder of COUNT PNGs of MP
   megapixels with ``--workers W``, for each decode pixel budget in ``--budgets`` (MP;
   ``CLIPFORGE_DECODE_BUDGET_MP``, 0 = off). ``--src DIR`` runs another checkout's ``src`` (the code
   before the budget) for a before/after figure (issue 11.15).

    python benchmarks/bench_data.py --decode-memory [--mp 50 --count 8 --workers 8 --budgets 0,100]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

from clipforge.data.decode import decode_image
from clipforge.data.reader import iter_tar_samples
from clipforge.data.shards import expand_shards
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.utils import emit_json, format_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
SIZE = 224


def ours(data: bytes) -> Image.Image:
    return ImageTransform(PreprocessConfig(size=SIZE)).geometry(decode_image(data, draft_size=SIZE))


def plain_pillow(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = SIZE / min(w, h)
    img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BICUBIC)
    left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
    return img.crop((left, top, left + SIZE, top + SIZE))


FUNCS = {"ours": ours, "pillow": plain_pillow}


def _work(args: tuple[str, list[bytes]]) -> int:
    name, items = args
    fn = FUNCS[name]
    for d in items:
        fn(d)
    return len(items)


def images_per_s(name: str, images: list[bytes], procs: int, repeat: int = 2) -> float:
    """Best of ``repeat`` wall-clock runs; work split evenly over ``procs`` worker processes."""
    best = 0.0
    chunks = [(name, images[i::procs]) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_work, [(name, c[1][:5]) for c in chunks])  # warm up workers
        for _ in range(repeat):
            t = time.perf_counter()
            n = sum(pool.map(_work, chunks))
            best = max(best, n / (time.perf_counter() - t))
    return best


def load_jpegs(urls: list[str], limit: int) -> list[bytes]:
    out = []
    for u in urls:
        for s in iter_tar_samples(u):
            if "jpg" in s:
                out.append(s["jpg"])
                if len(out) >= limit:
                    return out
    return out


def upscale(images: list[bytes], size: tuple[int, int] = (800, 600)) -> list[bytes]:
    out = []
    for d in images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(d)).convert("RGB").resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def read_mb_s(urls: list[str], how: str) -> float:
    nbytes, t = 0, time.perf_counter()
    if how == "ours":
        for u in urls:
            for s in iter_tar_samples(u):
                nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
    elif how == "tarfile":
        for u in urls:
            with tarfile.open(u, "r|") as tf:
                for m in tf:
                    if m.isfile():
                        nbytes += len(tf.extractfile(m).read())  # type: ignore[union-attr]
    elif how == "webdataset":
        import webdataset as wds

        for u in urls:
            with open(u, "rb") as f:
                for s in wds.tariterators.tar_file_expander([{"stream": f, "url": u}]):
                    nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
    return nbytes / 1e6 / (time.perf_counter() - t)


def make_pngs(folder: Path, count: int, mp: float) -> None:
    """COUNT RGB PNGs of ``mp`` megapixels (a compressible pattern: small files, full-size decodes)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    w = int((mp * 1e6 * 3 / 2) ** 0.5)
    h = int(mp * 1e6 / w)
    yy, xx = np.indices((h, w), dtype=np.uint32)
    for i in range(count):
        arr = np.stack([(xx + i) % 256, (yy * 3) % 256, (xx ^ yy) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png", compress_level=1)
        (folder / f"img{i}.txt").write_text(f"pattern {i}")


def ingest_peak_rss(folder: Path, out: Path, workers: int, budget_mp: float, src: str | None) -> dict:
    """Run ``clipforge data ingest`` in a child process; its own peak RSS (wait4) and wall time."""
    import subprocess

    env = {**os.environ, "CLIPFORGE_DECODE_BUDGET_MP": str(budget_mp)}
    if src:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, "-m", "clipforge.cli", "data", "ingest", str(folder), "--output", str(out)]
    cmd += ["--workers", str(workers), "--json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    written = None
    if proc.returncode == 0:
        import json

        written = json.loads(stdout.decode().strip().splitlines()[-1])["written"]
    return {
        "budget_mp": budget_mp,
        "src": src or "this checkout",
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "wall_s": time.monotonic() - t0,
        "written": written,
        "rc": proc.returncode,
    }


def decode_memory(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pngs"
        print(f"writing {args.count} PNGs of {args.mp} MP...", file=sys.stderr)
        # in a spawned child: a parent that held the arrays would pass its RSS high-water mark to every
        # forked ingest child (ru_maxrss counts the pages shared before exec)
        maker = mp.get_context("spawn").Process(target=make_pngs, args=(folder, args.count, args.mp))
        maker.start()
        maker.join()
        runs = []
        for i, b in enumerate(float(x) for x in args.budgets.split(",")):
            runs.append(ingest_peak_rss(folder, Path(tmp) / f"out{i}", args.workers, b, args.src))
    rows = [
        [r["src"], r["budget_mp"], f"{r['peak_rss_mb']:.0f}", f"{r['wall_s']:.1f}", r["written"]]
        for r in runs
    ]
    out = sys.stderr if args.json else sys.stdout
    print(format_table(rows, ["code", "budget MP", "peak RSS MB", "wall s", "written"]), file=out)
    if args.json:
        emit_json({"count": args.count, "mp": args.mp, "workers": args.workers, "runs": runs})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-memory", action="store_true", help="peak RSS of ingest over big PNGs only")
    ap.add_argument("--mp", type=float, default=50.0, help="--decode-memory: megapixels per PNG")
    ap.add_argument("--count", type=int, default=8, help="--decode-memory: number of PNGs")
    ap.add_argument("--workers", type=int, default=8, help="--decode-memory: ingest --workers")
    ap.add_argument("--budgets", default="0,100", help="--decode-memory: pixel budgets (MP) to compare")
    ap.add_argument("--src", default=None, help="--decode-memory: PYTHONPATH of the code to measure")
    ap.add_argument("--data", default=str(DEFAULT_DATA / "flickr8k"), help="flickr8k shard directory")
    ap.add_argument("--images", type=int, default=1000, help="images per decode benchmark")
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    if args.decode_memory:
        return decode_memory(args)
    urls = expand_shards(str(Path(args.data) / "train-*.tar"))
    procs = [int(p) for p in args.procs.split(",")]

    print(f"loading {args.images} flickr8k JPEGs and making 800x600 copies...", file=sys.stderr)
    small = load_jpegs(urls, args.images)
    big = upscale(small)
    results: dict = {"images": len(small), "decode": [], "read": []}
    rows = []
    for label, imgs in (("flickr 224x224", small), ("upscaled 800x600", big)):
        for p in procs:
            o = images_per_s("ours", imgs, p)
            b = images_per_s("pillow", imgs, p)
            results["decode"].append(
                {"images": label, "procs": p, "ours_img_s": o, "pillow_img_s": b, "ratio": o / b}
            )
            rows.append([label, p, round(o), round(b), f"{o / b:.2f}x"])
    out = sys.stderr if args.json else sys.stdout
    print(format_table(rows, ["images", "procs", "ours img/s", "pillow img/s", "ratio"]), file=out)

    for u in urls:  # warm the page cache so all readers see the same storage
        Path(u).read_bytes()
    speeds = {h: max(read_mb_s(urls, h) for _ in range(2)) for h in ("tarfile", "ours", "webdataset")}
    results["read"] = {
        **{f"{k}_mb_s": v for k, v in speeds.items()},
        "ours_vs_tarfile": speeds["ours"] / speeds["tarfile"],
        "webdataset_vs_tarfile": speeds["webdataset"] / speeds["tarfile"],
    }
    read_rows = [[k, f"{v:.0f}", f"{v / speeds['tarfile']:.2f}x"] for k, v in speeds.items()]
    print(format_table(read_rows, ["shard reader", "MB/s", "vs tarfile"]), file=out)
    results["cpu_count"] = os.cpu_count()
    if args.json:
        emit_json(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
