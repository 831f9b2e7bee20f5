"""`clipforge data` CLI: help texts, and the real-data inspect the issue's "done when" names."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from clipforge.cli import main


@pytest.mark.parametrize(
    "argv", [["data", "--help"], ["data", "ingest", "--help"], ["data", "inspect", "--help"]]
)
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: clipforge data" in capsys.readouterr().out


def test_ingest_without_input_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["data", "ingest", "--output", str(tmp_path / "o")]) == 2
    assert "--retry-from" in capsys.readouterr().err


def test_ingest_shortest_side_flags(tmp_path: Path, capsys) -> None:
    from data_testutils import image_bytes
    from PIL import Image

    from clipforge.data.reader import iter_tar_samples

    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(50, 30))
    (src / "a.txt").write_text("a small photo")
    both = ["data", "ingest", str(src), "-o", str(tmp_path / "o"), "--max-side=100", "--shortest-side=64"]
    assert main(both) == 2 and "not both" in capsys.readouterr().err
    cases = {(): (107, 64), ("--resize-only-if-bigger",): (50, 30)}  # upsampled unless the flag
    for extra, size in cases.items():
        out = tmp_path / f"out{len(extra)}"
        assert main(["data", "ingest", str(src), "-o", str(out), "--shortest-side", "64", *extra]) == 0
        (sample,) = iter_tar_samples(str(next(out.glob("*.tar"))))
        assert Image.open(io.BytesIO(sample["jpg"])).size == size


@pytest.mark.slow
def test_inspect_flickr_train_counts_6000(shared_data: Path, tmp_path: Path, capsys) -> None:
    spec = str(shared_data / "flickr8k" / "train-*.tar")
    assert main(["data", "inspect", spec, "--output", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == summary["good"] == 6000 and summary["shards"] == 6
    assert all(v["samples"] == 1000 for v in summary["per_shard"].values())
    assert summary["image_sizes_top"] == [["224x224", 6000]]
    assert (tmp_path / "contact_sheet.png").stat().st_size > 100_000


def test_inspect_default_output_is_under_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 10: one default root; ``data inspect`` used to write ./inspect_out/."""
    from data_testutils import good_sample, write_tar

    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "s.tar", [good_sample("a")])
    assert main(["data", "inspect", "s.tar", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["good"] == 1
    assert (tmp_path / "runs" / "inspect" / "inspect.json").exists() and not (
        tmp_path / "inspect_out"
    ).exists()
