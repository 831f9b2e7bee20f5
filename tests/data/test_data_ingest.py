"""Ingest from a folder, tables, shards and URLs (local HTTP server): exact counts, retry list, resize."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from data_testutils import image_bytes, write_tar
from PIL import Image

from clipforge.cli import main
from clipforge.data.fetch import FetchConfig, robots_optout
from clipforge.data.ingest import IngestConfig, ingest
from clipforge.data.reader import iter_tar_samples
from clipforge.data.writer import read_side_table


def _all_samples(out: Path) -> list[dict]:
    return [s for p in sorted(out.glob("*.tar")) for s in iter_tar_samples(str(p))]


def _cfg(out: Path, **kw) -> IngestConfig:
    kw.setdefault("workers", 4)
    return IngestConfig(output=out, **kw)


def test_ingest_folder(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(image_bytes(40, 30, seed=1))
    (src / "a.txt").write_text("a red thing\n")
    (src / "sub" / "b.png").write_bytes(image_bytes(20, 20, "PNG", seed=2, mode="RGBA"))
    (src / "sub" / "b.txt").write_text("a transparent thing")
    (src / "c.gif").write_bytes(image_bytes(16, 16, "GIF", seed=3, mode="P"))
    (src / "c.txt").write_text("an old format")
    (src / "big.jpg").write_bytes(image_bytes(300, 200, seed=4))
    (src / "big.txt").write_text("large photo")
    (src / "nocap.jpg").write_bytes(image_bytes(seed=5))  # no caption file
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "broken.txt").write_text("caption of a broken image")
    (src / "empty.jpg").write_bytes(image_bytes(seed=6))
    (src / "empty.txt").write_text("   ")
    out = tmp_path / "out"
    stats = ingest([str(src)], _cfg(out, max_side=100, maxcount=2), progress=False)
    assert stats["kind"] == "folder" and stats["written"] == 4 and stats["skipped"] == 3
    assert stats["skipped_by_reason"] == {"missing_caption": 1, "corrupt_image": 1, "empty_caption": 1}
    bad = json.loads((out / "bad_samples.json").read_text())
    assert bad["counts"] == stats["skipped_by_reason"] and bad["total"] == 3
    assert any("nocap.jpg" in k for k in bad["keys"]["missing_caption"])
    samples = _all_samples(out)
    assert len(samples) == 4 and len(stats["shards"]) == 2  # maxcount=2
    by_src = {json.loads(s["json"])["source"].split("/")[-1]: s for s in samples}
    assert set(by_src) == {"a.jpg", "big.jpg", "c.gif", "b.png"}
    assert "jpg" in by_src["big.jpg"] and Image.open(io.BytesIO(by_src["big.jpg"]["jpg"])).size == (100, 67)
    assert by_src["a.jpg"]["jpg"] == (src / "a.jpg").read_bytes(), "small valid JPEGs are stored untouched"
    assert "png" in by_src["b.png"] and "jpg" in by_src["c.gif"]  # GIF re-encoded as JPEG
    assert by_src["a.jpg"]["txt"] == b"a red thing"
    table = read_side_table(out)
    assert table.num_rows == 4
    row = {r["source"].split("/")[-1]: r for r in table.to_pylist()}["big.jpg"]
    assert (row["width"], row["height"]) == (100, 67)


def _smallest_max_size(w: int, h: int, s: int) -> tuple[int, int]:
    """img2dataset keep_ratio = albumentations SmallestMaxSize: scale s / min(h, w), round each side."""
    scale = s / min(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


# (w, h, format): larger, smaller, equal, a .5 rounding tie (201 * 0.5), a huge-JPEG draft case, PNG, GIF
_SHORTEST_CASES = [(300, 200, "JPEG"), (50, 30, "JPEG"), (64, 100, "JPEG"), (201, 128, "JPEG"),
                   (1200, 900, "JPEG"), (90, 257, "PNG"), (40, 48, "GIF")]  # fmt: skip
_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif"}


@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_ingest_shortest_side_follows_img2dataset_keep_ratio(tmp_path: Path, only_if_bigger: bool) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    names = [f"{i}_{w}x{h}.{_EXT[fmt]}" for i, (w, h, fmt) in enumerate(_SHORTEST_CASES)]
    for i, (w, h, fmt) in enumerate(_SHORTEST_CASES):
        mode = "P" if fmt == "GIF" else "RGB"
        (src / names[i]).write_bytes(image_bytes(w, h, fmt, seed=i, mode=mode))
        (src / f"{i}_{w}x{h}.txt").write_text(f"image {i}")
    out = tmp_path / "out"
    cfg = _cfg(out, shortest_side=64, only_if_bigger=only_if_bigger)
    stats = ingest([str(src)], cfg, progress=False)
    assert stats["written"] == len(_SHORTEST_CASES) and stats["skipped"] == 0
    by_name = {json.loads(s["json"])["source"].split("/")[-1]: s for s in _all_samples(out)}
    for i, (w, h, fmt) in enumerate(_SHORTEST_CASES):
        name = names[i]
        sample = by_name[name]
        ext = next(e for e in ("jpg", "png") if e in sample)
        got = Image.open(io.BytesIO(sample[ext])).size
        want = (w, h) if only_if_bigger and min(w, h) <= 64 else _smallest_max_size(w, h, 64)
        assert got == want, name
        meta = json.loads(sample["json"])
        assert [meta[k] for k in ("width", "height", "original_width", "original_height")] == [*want, w, h]
        if want != (w, h):
            assert ext == "jpg"  # resized: re-encoded as JPEG
        elif fmt != "GIF":
            assert sample[ext] == (src / name).read_bytes()  # untouched: original bytes kept
    assert _smallest_max_size(201, 128, 64) == (100, 64)  # the case above is a tie: 100.5 rounds to even


def test_no_draft_decodes_at_full_size_before_shrinking() -> None:
    from clipforge.data.decode import decode_image
    from clipforge.data.ingest import prepare_image

    data = image_bytes(1200, 900, seed=7)
    full = decode_image(data).resize((85, 64), Image.Resampling.BOX)  # the rule without libjpeg's draft
    drafted = decode_image(data, draft_size=64).resize((85, 64), Image.Resampling.BOX)
    assert drafted.tobytes() != full.tobytes()  # the draft path really differs on this image
    refs = {False: full, True: drafted}
    for draft in (False, True):
        _, out, size = prepare_image(data, None, 100, shortest_side=64, draft=draft)
        got = Image.open(io.BytesIO(out))
        assert (size["width"], size["height"]) == got.size == (85, 64)
        err = {d: sum(abs(x - y) for x, y in zip(got.tobytes(), ref.tobytes())) for d, ref in refs.items()}
        assert err[draft] < err[not draft], draft  # closest to its own decode path (q100 re-encode)


def test_shortest_side_plan_filters_and_limits(tmp_path: Path, monkeypatch) -> None:
    from clipforge.data.decode import SkipSample
    from clipforge.data.ingest import prepare_image
    from clipforge.data.resize import plan_resize

    down, up = plan_resize(300, 200, shortest_side=64), plan_resize(50, 30, shortest_side=64)
    assert (down.size, down.resample, down.shrinks) == ((96, 64), Image.Resampling.BOX, True)  # INTER_AREA
    assert (up.size, up.resample, up.shrinks) == ((107, 64), Image.Resampling.LANCZOS, False)
    assert plan_resize(50, 30, shortest_side=64, only_if_bigger=True).size is None
    assert plan_resize(64, 90, shortest_side=64).size is None  # shortest side already S
    assert plan_resize(300, 200, max_side=100).size == (100, 67)  # the old rule unchanged
    with pytest.raises(ValueError, match="not both"):
        plan_resize(300, 200, max_side=100, shortest_side=64)
    with pytest.raises(ValueError, match="not both"):
        ingest([str(tmp_path)], _cfg(tmp_path / "o", max_side=100, shortest_side=64), progress=False)
    assert not (tmp_path / "o").exists()  # refused before the output directory is touched
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(SkipSample) as e:  # a 2x400 strip upsampled to 64x12800: over the pixel limit
        prepare_image(image_bytes(2, 400, "PNG"), None, 95, shortest_side=64)
    assert e.value.reason == "resize_too_large"


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_ingest_table_formats(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(seed=i))
        rows.append({"path": f"img/{i}.jpg", "text": f"caption number {i}", "license": "cc-by"})
    rows.append({"path": "img/missing.jpg", "text": "no such file", "license": "x"})
    rows.append({"path": "img/0.jpg", "text": "", "license": "x"})
    table = tmp_path / f"pairs.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        table.write_text(
            "path" + sep + "text" + sep + "license\n" + "".join(sep.join(r.values()) + "\n" for r in rows)
        )
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    stats = ingest([str(table)], _cfg(out, image_column="path", caption_column="text"), progress=False)
    assert stats["written"] == 4
    assert stats["skipped_by_reason"] == {"missing_image": 1, "empty_caption": 1}
    samples = _all_samples(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(4)]
    meta = json.loads(samples[2]["json"])
    assert meta["caption"] == "caption number 2" and meta["license"] == "cc-by"
    with pytest.raises(ValueError, match="no column"):
        ingest([str(table)], _cfg(tmp_path / "out2"), progress=False)  # default column names absent


def test_reshard_keeps_good_and_reports_bad(tmp_path: Path) -> None:
    from test_data_fuzz import build_fuzz_shards

    urls, kept, expected = build_fuzz_shards(
        tmp_path / "in" if (tmp_path / "in").mkdir() is None else tmp_path
    )
    dup = write_tar(
        tmp_path / "dup.tar", [{"__key__": sorted(kept)[0], "jpg": image_bytes(), "txt": b"again"}]
    )
    out = tmp_path / "out"
    stats = ingest([*urls, str(dup)], _cfg(out, maxcount=10, max_side=20), kind="shards", progress=False)
    assert stats["written"] == len(kept)
    assert Counter(stats["skipped_by_reason"]) == expected + Counter({"duplicate_key": 1})
    samples = _all_samples(out)
    assert {s["__key__"] for s in samples} == kept
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (20, 13) for s in samples)  # 24x16 -> max 20


class _Handler(http.server.BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        st = self.state
        with st["lock"]:
            st["hits"][self.path] += 1
        try:
            self._serve(st)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _serve(self, st: dict) -> None:
        p = self.path
        headers: dict[str, str] = {}
        if p.startswith("/good/"):
            # Concurrency is counted over this sleep only, and released before the response is sent: a
            # client can start its next request only after reading this one, so no false overlap. (The
            # slow URL is not counted: the client gives up on it by design while the server still waits.)
            with st["lock"]:
                st["active"] += 1
                st["max_active"] = max(st["max_active"], st["active"])
            time.sleep(0.03)  # overlap requests so the per-host limit is observable
            with st["lock"]:
                st["active"] -= 1
            body = image_bytes(seed=int(p.split("/")[-1].split(".")[0]))
        elif p == "/broken.jpg":
            body = b"<html>this is not an image</html>"
        elif p == "/slow.jpg":
            if st["slow"]:
                st["release"].wait(10)  # far past the client timeout; set at teardown
            body = image_bytes(seed=77)
        elif p == "/flaky.jpg":
            if st["hits"][p] == 1:
                self.send_response(503)
                self.end_headers()
                return
            body = image_bytes(seed=78)
        elif p == "/noai.jpg":
            body, headers = image_bytes(seed=79), {"X-Robots-Tag": "noai"}
        elif p == "/otherbot.jpg":
            body, headers = image_bytes(seed=80), {"X-Robots-Tag": "otherbot: noimageai"}
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture()
def image_server():
    _Handler.state = {
        "lock": threading.Lock(),
        "active": 0,
        "max_active": 0,
        "hits": Counter(),
        "slow": True,
        "release": threading.Event(),
    }
    srv = _QuietServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Handler.state
    _Handler.state["release"].set()
    srv.shutdown()
    srv.server_close()


def test_url_ingest_exact_counts_and_retry(tmp_path: Path, image_server, capsys) -> None:
    base, state = image_server
    paths = [f"/good/{i}.jpg" for i in range(6)] + [
        "/broken.jpg",
        "/slow.jpg",
        "/missing.jpg",
        "/noai.jpg",
        "/otherbot.jpg",
        "/flaky.jpg",
    ]
    table = tmp_path / "urls.csv"
    table.write_text("url,caption\n" + "".join(f"{base}{p},caption for {p}\n" for p in paths))
    out = tmp_path / "out"
    cfg = _cfg(
        out,
        workers=8,
        fetch=FetchConfig(timeout=1.0, retries=1, backoff=0.05, per_host=2, allow_private=True),
    )  # 1 s: robust on a loaded machine
    stats = ingest([str(table)], cfg, progress=False)
    # good x6 + otherbot (opt-out scoped to another agent) + flaky (503 then 200 on retry)
    assert stats["written"] == 8
    assert stats["skipped_by_reason"] == {"corrupt_image": 1, "timeout": 1, "http_404": 1, "robots_optout": 1}
    assert (
        state["hits"]["/flaky.jpg"] == 2
        and state["hits"]["/slow.jpg"] == 2
        and state["hits"]["/missing.jpg"] == 1
    )
    assert state["max_active"] <= 2, "per-host concurrency limit"
    retry = [json.loads(x) for x in (out / "retry.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in retry] == [(f"{base}/slow.jpg", "timeout")]
    assert len(read_side_table(out)) == 8

    state["slow"] = False  # the slow server recovered: the retry run fetches only the failed URL
    hits_before = sum(state["hits"].values())
    rc = main(
        [
            "data",
            "ingest",
            "--retry-from",
            str(out / "retry.jsonl"),
            "--output",
            str(out),
            "--timeout",
            "2",
            "--allow-private-urls",
            "--json",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["written"] == 1 and printed["retry_count"] == 0 and printed["shards"] == ["shard-000001.tar"]
    )
    assert sum(state["hits"].values()) == hits_before + 1
    assert (out / "bad_samples.retry1.json").exists() and (out / "bad_samples.json").exists()
    keys = [s["__key__"] for s in _all_samples(out)]
    assert len(keys) == len(set(keys)) == 9 and "000000007" in keys  # slow.jpg kept its original key
    assert (out / "retry.jsonl").read_text() == ""


def test_robots_rule() -> None:
    d = ("noai", "noimageai", "noindex", "noimageindex")
    assert robots_optout(["noai"], "clipforge", d)
    assert robots_optout(["nofollow, NoImageAI"], "clipforge", d)
    assert robots_optout(["clipforge: noai"], "clipforge", d)
    assert not robots_optout(["otherbot: noai"], "clipforge", d)
    assert not robots_optout(["nofollow"], "clipforge", d)
    assert not robots_optout([], "clipforge", d)


def test_cli_inspect_json_and_contact_sheet(tmp_path: Path, capsys) -> None:
    from test_data_fuzz import build_fuzz_shards

    urls, kept, expected = build_fuzz_shards(tmp_path, per_shard=15, shards=2)
    out = tmp_path / "inspect"
    assert main(["data", "inspect", *urls, "--output", str(out), "--samples", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["good"] == len(kept)
    assert Counter(summary["bad_samples"]["counts"]) == expected
    assert sum(v["samples"] for v in summary["per_shard"].values()) == summary["samples"]
    assert sum(n for _, n in summary["caption_words_hist"]) == len(kept)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 4 * 256 and sheet.size[1] > 2 * 256  # 5 samples -> 4 columns x 2 rows
    for f in ("caption_length_hist.png", "image_size_hist.png", "bad_samples.json", "inspect.json"):
        assert (out / f).stat().st_size > 0
