"""Shard specs never run a command unless typed by a person (issue 11, items 1 and 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_testutils import good_sample, write_tar

from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import ShardSpecError, expand_shards, shards_from_file


@pytest.mark.parametrize("spec", ["*.tar", ".", "*", "{p*,q*}.tar"])
def test_glob_and_dir_results_are_plain_files(tmp_path: Path, monkeypatch, spec: str) -> None:
    """A file named ``pipe:touch pwned;.tar`` is read as a shard, not run (issue 11.1)."""
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "pipe:touch pwned;.tar", [good_sample("a")])
    write_tar(tmp_path / "q.tar", [good_sample("q")])
    urls = [u for u in expand_shards(spec) if u]
    assert urls and not any(u.startswith("pipe:") for u in urls)
    report = BadSampleReport()
    keys = [s["__key__"] for u in urls for s in iter_tar_samples(u, report)]
    assert not (tmp_path / "pwned").exists()
    assert keys == ["a", "q"] and report.total == 0


def test_cli_inspect_glob_runs_nothing(tmp_path: Path, monkeypatch) -> None:
    from clipforge.cli import main

    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "pipe:touch pwned;.tar", [good_sample("a")])
    rc = main(["data", "inspect", "*.tar", "--output", str(tmp_path / "out"), "--json"])
    assert rc == 0 and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "entries",
    [["pipe:touch pwned"], ["ok.tar", " pipe:touch pwned"], ["{pipe:touch pwned,x}"], "pipe:cat x"],
)
def test_lists_from_files_refuse_pipe(tmp_path: Path, monkeypatch, entries) -> None:
    """Manifests, run configs, checkpoints, retry lists: pipe: is refused with a clear message (11.2)."""
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "ok.tar", [good_sample("a")])
    for expand in (True, False):
        with pytest.raises(ShardSpecError, match="only honoured as an explicit command-line") as e:
            shards_from_file(entries, source="DIR/manifest.json", expand=expand)
        assert "DIR/manifest.json" in str(e.value)
    with pytest.raises(ShardSpecError):
        expand_shards(entries, allow_pipe=False)
    assert not (tmp_path / "pwned").exists()


def test_lists_from_files_keep_paths_urls_and_plain_globbed_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "pipe:x.tar", [good_sample("a")])
    write_tar(tmp_path / "b.tar", [good_sample("b")])
    stored = expand_shards("*.tar")  # what a manifest would record
    assert shards_from_file(stored, source="m.json") == stored
    assert shards_from_file(["http://h/x.tar"], source="m.json", expand=False) == ["http://h/x.tar"]
    with pytest.raises(ShardSpecError, match="not a string"):
        shards_from_file([{"a": 1}], source="m.json")
    assert os.path.exists(stored[1])


def test_explicit_pipe_argument_still_works(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [good_sample("a")])
    (url,) = expand_shards(f"pipe:cat {shard}")
    assert [s["__key__"] for s in iter_tar_samples(url)] == ["a"]
