"""Issue 11 in curate: one regression test per numbered case (2, 9, 11, 12), driven through the CLI."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from curate_testutils import image_bytes, make_shards, write_shard

from clipforge.cli import main


def curate(*argv: str) -> int:
    return main(["curate", *argv])


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory):
    """A `curate run` output dir (text, image, dedup) over the two synthetic shards (scored once)."""
    d = tmp_path_factory.mktemp("scored")
    shards = make_shards(d)
    out = d / "scores"
    rc = curate(
        "run", "--data", *map(str, shards), "--output", str(out), "--stages", "text,image,dedup", "--json"
    )
    assert rc == 0
    return out


@pytest.fixture()
def scored(scored_once, tmp_path):
    """A private copy of the scored dir (tests edit its manifest or write reports into it)."""
    return Path(shutil.copytree(scored_once, tmp_path / "scores"))


def one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert "Traceback" not in cap.err and len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


# -- 2: a shard list read back from DIR/manifest.json never runs a command ------------------------
@pytest.mark.parametrize(
    "entry", ["pipe:touch {pwned}", "pipe:touch {pwned}{{,}}", "pipe:sh -c 'touch {pwned}'"]
)
@pytest.mark.parametrize("command", ["filter", "report"])
def test_manifest_pipe_entry_is_refused_not_run(scored, tmp_path, capsys, entry, command):
    pwned = tmp_path / "pwned"
    m = json.loads((scored / "manifest.json").read_text())
    m["urls"] = [entry.format(pwned=pwned), *m["urls"]]
    (scored / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    if command == "filter":
        rc = curate(
            "filter", "--scores", str(scored), "--where", "image_valid", "--output", str(tmp_path / "f")
        )
    else:
        rc = curate("report", "--scores", str(scored), "--sheet-column", "caption_words", "--examples", "2")
    assert rc == 2 and not pwned.exists()
    assert "pipe:" in one_error_line(capsys)


# -- 9: a second run into the same --output never mixes with the first ---------------------------
def tar_keys(d):
    keys = []
    for p in sorted(d.glob("*.tar")):
        with tarfile.open(p) as tf:
            keys += sorted({n.rsplit(".", 1)[0] for n in tf.getnames()})
    return keys


def test_filter_twice_into_one_output_is_refused_or_replaced(scored, tmp_path, capsys):
    out = tmp_path / "curated"
    base = ["filter", "--scores", str(scored), "--output", str(out), "--maxcount", "3", "--json"]
    assert curate(*base, "--where", "caption_words >= 1") == 0
    first = json.loads(capsys.readouterr().out)["kept"]
    assert curate(*base, "--where", "caption_words >= 9") == 2
    assert "already holds a previous result" in json.loads(capsys.readouterr().out)["error"]
    assert len(tar_keys(out)) == first  # the refused run touched nothing
    assert curate(*base, "--where", "caption_words >= 9", "--overwrite") == 0
    second = json.loads(capsys.readouterr().out)
    keys = tar_keys(out)
    assert 0 < second["kept"] < first and len(keys) == len(set(keys)) == second["kept"]
    assert (out / "keep.txt").read_text().split() == sorted(
        keys, key=(out / "keep.txt").read_text().split().index
    )


def test_report_twice_and_outputs_holding_inputs(scored, tmp_path, capsys):
    rep = ["report", "--scores", str(scored), "--sheet-column", "caption_words", "--examples", "1", "--json"]
    assert curate(*rep) == 0
    assert (
        curate(*rep) == 2 and "--overwrite" in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    )
    assert curate(*rep, "--overwrite") == 0
    capsys.readouterr()
    # --overwrite may never delete what the command reads: the scores dir, or a dir of input shards
    shard_dir = Path(json.loads((scored / "manifest.json").read_text())["urls"][0]).parent
    for out in (scored, shard_dir):
        rc = curate(
            "filter", "--scores", str(scored), "--where", "image_valid", "--output", str(out), "--overwrite"
        )
        assert rc == 2 and "holds an input" in one_error_line(capsys)
    assert (scored / "scores.parquet").exists() and (shard_dir / "part-000000.tar").exists()


# -- 11: captions drawn on plots are plain text -----------------------------------------------------
def test_report_survives_mathtext_captions(tmp_path, capsys):
    caps = [r"$\undefinedmacro{x}$", "$x^$ and $$", r"\frac{a}{b} $\sqrt{$", "a dog on the grass"]
    shard = write_shard(
        tmp_path / "m.tar", [{"key": f"k{i}", "jpg": image_bytes(i), "txt": c} for i, c in enumerate(caps)]
    )
    out = tmp_path / "scores"
    assert curate("run", "--data", str(shard), "--output", str(out), "--stages", "text,image", "--json") == 0
    capsys.readouterr()
    rc = curate(
        "report", "--scores", str(out), "--sheet-column", "caption_chars", "--examples", "4", "--json"
    )
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and (out / "report" / "lowest_caption_chars.png").stat().st_size > 1000
    assert r["bad_samples"] == {}


# -- 12: every malformed filter expression: one clear line, exit code 2 ------------------------------
BAD = [
    "1 == 1",
    "x in ('a', 1)",
    "lang in ('en', 1)",
    "(" * 2000 + "image_valid" + ")" * 2000,
    "not " * 2000 + "image_valid",
    "caption_words in (1e30)",
    "caption_words top 1e400%",
    "lang > 0.5",
    "image_valid == 'yes'",
    "'unterminated",
    "caption_words >",
    "x" * 20_000,
    "caption_words >= 3 and",
    "é > 1",
    "caption_words\n>= 3 or\n",
]


@pytest.mark.parametrize("expr", BAD, ids=lambda e: repr(e[:20]))
def test_malformed_filter_is_one_line_exit_2(scored, tmp_path, capsys, expr):
    capsys.readouterr()
    assert curate("filter", "--scores", str(scored), "--where", expr, "--output", str(tmp_path / "f")) == 2
    line = one_error_line(capsys)
    assert len(line) < 2000 and not (tmp_path / "f").exists()
    assert curate("report", "--scores", str(scored), "--where", expr, "--examples", "0") == 2
    one_error_line(capsys)


@pytest.mark.parametrize("extra", [["--maxcount", "0"], ["--prefix", "../escape"], ["--prefix", "a%d"]])
def test_filter_bad_options_refused_before_touching_output(scored, tmp_path, capsys, extra):
    out = tmp_path / "curated"
    out.mkdir()
    (out / "old.txt").write_text("an earlier result")
    capsys.readouterr()
    rc = curate(
        "filter",
        "--scores",
        str(scored),
        "--where",
        "image_valid",
        "--output",
        str(out),
        "--overwrite",
        *extra,
    )
    assert rc == 2 and (out / "old.txt").exists() and not (tmp_path / "escape-000000.tar").exists()
    one_error_line(capsys)
