"""Index build output dir (issue 11): resume the same build, refuse another, clean stale .tmp,
never take a shard URL from a file, strict options, DataLoader workers die with the build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clipforge.config import ConfigError
from clipforge.index import BuildOptions, build_index
from clipforge.utils import OutputExistsError


def _opts(**kw):
    return BuildOptions(**{"batch_size": 16, "workers": 0, "eval_queries": 20, **kw})


def test_rerun_resumes_and_another_build_is_refused(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    a, b = str(shard_dir / "a-000000.tar"), str(shard_dir / "b-000001.tar")
    build_index(a, tiny_model, out, _opts(), progress=False)
    assert (out / "config.yaml").is_file()
    assert build_index(a, tiny_model, out, _opts(workers=0, batch_size=8), progress=False)["count"] == 29
    with pytest.raises(ConfigError, match="data"):  # other data into the same dir: refused, not mixed
        build_index(b, tiny_model, out, _opts(), progress=False)
    mf = build_index(b, tiny_model, out, _opts(), progress=False, overwrite=True)
    assert mf["count"] == 30 and not list((out / "parts").glob("a-*"))  # the old build is gone


def test_foreign_nonempty_dir_refused_unless_resume_or_overwrite(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    a = str(shard_dir / "a-000000.tar")
    with pytest.raises(OutputExistsError):
        build_index(a, tiny_model, out, _opts(), progress=False)
    build_index(a, tiny_model, out, _opts(), progress=False, resume=True)
    assert (out / "notes.txt").exists()
    build_index(a, tiny_model, out, _opts(), progress=False, overwrite=True)
    assert not (out / "notes.txt").exists()


def test_stale_tmp_of_a_killed_run_is_cleaned(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    a = str(shard_dir / "a-000000.tar")
    build_index(a, tiny_model, out, _opts(), progress=False)
    stale = [out / ".embeddings.npy.x1.tmp", out / "parts" / ".a-000000.npy.x2.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    build_index(a, tiny_model, out, _opts(), progress=False)
    assert not any(p.exists() for p in stale)


def test_part_record_never_supplies_a_shard_url(tmp_path, tiny_model, shard_dir, monkeypatch):
    out = tmp_path / "idx"
    a = str(shard_dir / "a-000000.tar")
    build_index(a, tiny_model, out, _opts(), progress=False)
    (rec_path,) = (out / "parts").glob("*.json")
    rec = json.loads(rec_path.read_text())
    rec["url"] = f"pipe:touch {tmp_path / 'pwned'}"  # a crafted record in the output dir
    rec_path.write_text(json.dumps(rec))
    monkeypatch.chdir(tmp_path)
    mf = build_index(a, tiny_model, out, _opts(), progress=False)
    assert [s["url"] for s in mf["shards"]] == [a]  # the part was rebuilt from the command-line URL
    assert not (tmp_path / "pwned").exists()


def test_build_options_strict_and_flags_generated(capsys):
    with pytest.raises(ConfigError, match="did you mean 'thumb_size'"):
        BuildOptions.from_dict({"thumb_sise": 64})
    with pytest.raises(ConfigError):
        BuildOptions.from_dict({"index_type": "annoy"})
    assert BuildOptions.from_dict({"ram_budget": "512MB"}).ram_budget == 512 << 20
    from clipforge.cli import main

    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    text = capsys.readouterr().out
    for flag in ("--eval-queries", "--seed", "--refine", "--ram-budget", "--max-per-shard", "--overwrite"):
        assert flag in text


def test_cli_refuses_another_build(tmp_path, shard_dir, tiny_spec):
    from clipforge.cli import main

    out = str(tmp_path / "idx")
    base = ["index", "build", "--model", tiny_spec, "--output", out, "--workers", "0"]
    assert main(base + ["--data", str(shard_dir / "a-000000.tar")]) == 0
    assert main(base + ["--data", str(shard_dir / "b-000001.tar")]) == 2
    assert main(base + ["--data", str(shard_dir / "b-000001.tar"), "--overwrite"]) == 0


CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from index_testutils import TinyClip, write_shard
    from clipforge.index import BuildOptions, build_index

    class SlowTransform:
        def __init__(self, tf, flag):
            self.tf, self.flag = tf, flag
        def __call__(self, img):
            with open(self.flag, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(30)
            return self.tf(img)

    write_shard({shard!r}, 4)
    m = TinyClip().eval()
    m.preprocess = SlowTransform(m.preprocess, {flag!r})
    build_index({shard!r}, m, {out!r}, BuildOptions(workers=1, batch_size=2), progress=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_build_leaves_no_decode_worker(tmp_path):
    flag = tmp_path / "worker.pid"
    script = CHILD.format(
        tests=str(Path(__file__).parent),
        shard=str(tmp_path / "s.tar"),
        flag=str(flag),
        out=str(tmp_path / "o"),
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not (flag.exists() and flag.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        assert flag.exists(), "the decode worker never started"
        worker = int(flag.read_text().split()[0])
        assert worker != proc.pid and _alive(worker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "DataLoader worker outlived its killed parent"


def test_search_never_runs_code_named_by_a_manifest(tmp_path, tiny_model, shard_dir, monkeypatch, capsys):
    """A shared index dir is data: its manifest's model may not be a py:MODULE:FUNCTION to import."""
    from clipforge.cli import main

    out = tmp_path / "idx"
    build_index(str(shard_dir / "a-000000.tar"), tiny_model, out, _opts(), progress=False)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "evil_factory.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef make(**kw):\n    raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    mf = json.loads((out / "manifest.json").read_text())
    mf["model"] = "py:evil_factory:make"
    (out / "manifest.json").write_text(json.dumps(mf))
    assert main(["index", "search", str(out), "a red square"]) == 2
    assert not marker.exists()
