"""`clipforge index build|search` end to end in-process (tiny model injected for the model spec)."""

from __future__ import annotations

import json

from clipforge.cli import main


def test_build_then_search_json(tmp_path, shard_dir, tiny_spec, capsys):
    out = tmp_path / "idx"
    argv = ["index", "build", "--data", str(shard_dir / "a-000000.tar"), str(shard_dir / "b-000001.tar")]
    rc = main(argv + ["--model", tiny_spec, "--output", str(out), "--workers", "0", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 59 and summary["bad_samples"] == 1 and summary["index"] == "Flat"

    rc = main(["index", "search", str(out), "a green square", "-k", "4", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "text" and len(res["results"]) == 4
    assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4]

    # table output names keys and captions
    assert main(["index", "search", str(out), "a green square", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "caption" in text and len(text.strip().splitlines()) == 5

    # image query by path: the image itself comes back first
    from clipforge.data.reader import iter_tar_samples

    raw = next(iter(iter_tar_samples(str(shard_dir / "b-000001.tar"))))
    img = tmp_path / "q.jpg"
    img.write_bytes(raw["jpg"])
    assert main(["index", "search", str(out), str(img), "-k", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "image" and res["results"][0]["key"] == raw["__key__"]

    # filters
    assert main(["index", "search", str(out), "x", "-k", "50", "--filter", "label=1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["results"]) == 19 and {r["label"] for r in res["results"]} == {1}  # a0007 is corrupt


def test_cli_errors_are_clean(tmp_path, shard_dir, tiny_spec, capsys):
    assert main(["index", "search", str(tmp_path / "missing"), "dog"]) == 2
    out = tmp_path / "idx"
    base = ["index", "build", "--data", str(shard_dir), "--model", tiny_spec, "--output", str(out)]
    assert main(base + ["--workers", "0", "--dims", "999"]) == 2
    assert (
        main(
            [
                "index",
                "build",
                "--data",
                str(tmp_path / "nope.tar"),
                "--model",
                tiny_spec,
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert main(base + ["--workers", "0", "--json"]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(out), "   "]) == 2
    assert main(["index", "search", str(out), "dog", "-k", "0"]) == 2
    assert main(["index", "search", str(out), "dog", "--filter", "nocol=1"]) == 2
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not an image")
    assert main(["index", "search", str(out), str(bad), "--image"]) == 2
