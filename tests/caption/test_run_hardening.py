"""``caption run`` hardening: side tables never land outside OUTPUT/captions (a ``pipe:`` command or a
name with ``..``), a shard name or sample key that is not valid UTF-8 never crashes the run after the
shard was captioned, and a '%' in a shard name does not break --write-shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from caption_testutils import slice_shard

from clipforge.caption import run as run_mod
from clipforge.caption.run import CaptionRunConfig, caption_shard, run_captions
from clipforge.config import ConfigError
from clipforge.data.reader import iter_tar_samples

ENC = "py:caption_testutils:tiny_clip"
ESCAPE = "pipe:cat ../../../../escaped.tar"  # its name is the whole command


def _fake_rows(url, cap, encoder, scorer, cfg, scorer_name):
    from clipforge.data.report import BadSampleReport

    return {"key": ["a"], "caption_synthetic": ["x"]}, BadSampleReport()


def test_caption_shard_never_writes_outside_captions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_mod, "recaption_shard", _fake_rows)
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(ConfigError, match="outside"):
        caption_shard(ESCAPE, None, None, None, CaptionRunConfig(), "none", out)
    assert not list(tmp_path.rglob("escaped*"))  # was tmp/a/escaped.parquet (+ .bad.json)


@pytest.mark.parametrize("spec", [ESCAPE, "pipe:cat x/../../../y.tar"])
def test_run_refuses_escaping_names_before_any_work(tmp_path: Path, spec: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="outside"):
        run_captions({"captioner": str(tmp_path / "no-captioner"), "data": [spec], "output": str(out)},
                     progress=False)  # fmt: skip
    assert not out.exists()


def test_run_refuses_non_utf8_shard_name_before_any_work(tmp_path: Path) -> None:
    shard = tmp_path / "s\udcff.tar"  # a file name with the byte 0xff
    shard.write_bytes(b"")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="UTF-8"):
        run_captions({"captioner": str(tmp_path / "no-captioner"), "data": [str(shard)], "output": str(out)},
                     progress=False)  # fmt: skip
    assert not out.exists()


@pytest.mark.slow
def test_non_utf8_key_is_a_skip_not_a_crash(shared_data, tmp_path: Path) -> None:
    """A member name with byte 0xff crashed the run in the Parquet write, after captioning."""
    from clipforge.caption.train import train_captioner

    fl = shared_data / "flickr8k"
    train = str(slice_shard(fl / "train-000000.tar", tmp_path / "train.tar", 8))
    cfg = {"data": [train], "output": str(tmp_path / "cap"), "model": ENC, "threads": 1, "workers": 0,
           "min_count": 1, "max_steps": 4, "batch_size": 8, "warmup": 1, "log_every": 2, "ckpt_every": 4,
           "keep": 1, "decoder": {"layers": 1, "width": 16, "heads": 2, "dropout": 0.0}}  # fmt: skip
    train_captioner(cfg, progress=False)
    test = slice_shard(fl / "test-000000.tar", tmp_path / "a%b.tar", 3)  # '%': not a pattern field
    jpg = next(s["jpg"] for s in iter_tar_samples(str(test)))
    with tarfile.open(test, "a") as t:
        for ext, data in (("jpg", jpg), ("txt", b"caption")):
            info = tarfile.TarInfo(f"bad\udcffkey.{ext}")  # written as the raw bytes b"bad\xffkey"
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert b"bad\xffkey.jpg" in test.read_bytes()
    out = tmp_path / "r"
    s = run_captions({"captioner": str(tmp_path / "cap" / "captioner"), "data": [str(test)], "output": str(out),
                      "encoder": ENC, "workers": 0, "write_shards": True}, progress=False)  # fmt: skip
    assert s["captions"] == 3 and s["bad_samples"]["counts"] == {"unsafe_key": 1}
    assert "bad\\udcffkey" in s["bad_samples"]["keys"]["unsafe_key"][0]  # by key, escaped
    assert pq.read_table(out / "captions" / "a%b.parquet").num_rows == 3
    assert (out / "shards" / "a%b-000.tar").is_file()
