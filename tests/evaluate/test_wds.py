"""``--dataset wds:DIR``: CLIP_benchmark's webdataset layout, built here from a few CIFAR-10 images.

The same images evaluated from the wds layout (webp, ``cls``/``txt``, ``{c}`` templates, caption lines)
and from clipforge shards (png, KEY.json captions, ``{}`` templates) must give the same metrics.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from evalutils import TinyClip
from PIL import Image

from clipforge.cli import main
from clipforge.data.reader import iter_tar_samples
from clipforge.evaluate.wds import clipforge_templates, split_caption_lines, wds_spec

TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c} {{in braces}}"]
N = 24


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipforge.models

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: TinyClip(seed=3).eval())


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _webp(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, format="webp", lossless=True)  # as CLIP_benchmark
    return buf.getvalue()


def _captions(label: int, names: list[str]) -> list[str]:
    return [f"a small {names[label]}", f"a {names[label]} next to a {names[(label + 1) % 10]}"]


@pytest.fixture
def cifar_sets(cifar_shard: Path, shared_data: Path, tmp_path: Path):
    """(wds classification dir, wds retrieval dir, clipforge shard, clipforge templates, classnames)."""
    names = (shared_data / "cifar10" / "classnames.txt").read_text().splitlines()
    samples = []
    for s in iter_tar_samples(str(cifar_shard)):
        samples.append((s["__key__"], s["png"], int(s["cls"])))
        if len(samples) == N:
            break
    cls_dir, ret_dir = tmp_path / "wds_cifar10", tmp_path / "wds_cifar_captions"
    for i in range(2):  # two shards, CLIP_benchmark's names and keys
        part = samples[i * N // 2 : (i + 1) * N // 2]
        _tar(cls_dir / "test" / f"{i}.tar",
             [{"__key__": f"s{i * N // 2 + j:07d}", "webp": _webp(p), "cls": str(c).encode()}
              for j, (_, p, c) in enumerate(part)])  # fmt: skip
        _tar(ret_dir / "test" / f"{i}.tar",
             [{"__key__": f"s{i * N // 2 + j:07d}", "webp": _webp(p), "txt": "\n".join(_captions(c, names)).encode()}
              for j, (_, p, c) in enumerate(part)])  # fmt: skip
    for d in (cls_dir, ret_dir):
        (d / "test" / "nshards.txt").write_text("2\n")
    (cls_dir / "classnames.txt").write_text("\n".join(names) + "\n")
    (cls_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (ret_dir / "dataset_type.txt").write_text("retrieval\n")
    # the same images as clipforge shards (png, labels, KEY.json captions) in the same order
    own = tmp_path / "own" / "own-000000.tar"
    _tar(own, [{"__key__": f"s{j:07d}", "png": p, "cls": str(c).encode(),
                "json": json.dumps({"captions": _captions(c, names)}).encode()}
               for j, (_, p, c) in enumerate(samples)])  # fmt: skip
    tmpl = tmp_path / "templates.json"
    tmpl.write_text(json.dumps([t.replace("{c}", "{}") for t in TEMPLATES]))
    return cls_dir, ret_dir, own, tmpl, shared_data / "cifar10" / "classnames.txt"


def _metrics(argv: list[str], capsys) -> dict:
    rc = main([*argv, "--model", "m", "--workers", "0", "--threads", "1", "--json", "--no-cache"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)["results"][0]


def test_wds_zeroshot_and_retrieval_equal_the_same_images_as_shards(patched, cifar_sets, tmp_path, capsys):
    cls_dir, ret_dir, own, tmpl, cn = cifar_sets
    a = _metrics(["eval", "zeroshot", "--dataset", f"wds:{cls_dir}", "--output", str(tmp_path / "a")], capsys)
    b = _metrics(["eval", "zeroshot", "--shards", str(own), "--classnames", str(cn), "--templates", str(tmpl),
                  "--output", str(tmp_path / "b")], capsys)  # fmt: skip
    assert a["dataset"] == "wds_cifar10" and a["n_images"] == N and a["n_templates"] == len(TEMPLATES)
    assert a["metrics"] == b["metrics"]
    c = _metrics(
        ["eval", "retrieval", "--dataset", f"wds:{ret_dir}", "--output", str(tmp_path / "c")], capsys
    )
    d = _metrics(["eval", "retrieval", "--shards", str(own), "--output", str(tmp_path / "d")], capsys)
    assert c["metrics"]["n_texts"] == 2 * N  # each txt line is a caption
    assert c["metrics"] == d["metrics"]
    # eval run takes wds dirs beside (or instead of) the built-ins, each with its own task
    rc = main(["eval", "run", "--model", "m", "--datasets", f"wds:{cls_dir},wds:{ret_dir}", "--workers", "0",
               "--threads", "1", "--json", "--no-cache", "--output", str(tmp_path / "e")])  # fmt: skip
    res = json.loads(capsys.readouterr().out)["results"]
    assert rc == 0 and [(r["dataset"], r["task"]) for r in res] == [
        ("wds_cifar10", "zeroshot"),
        ("wds_cifar_captions", "retrieval"),
    ]
    assert res[0]["metrics"]["top1"] == a["metrics"]["top1"]


def test_wds_layout_rules(cifar_sets, tmp_path):
    cls_dir, ret_dir, *_ = cifar_sets
    assert wds_spec(f"wds:{cls_dir}/test").name == "wds_cifar10"  # DIR/SPLIT names the split
    (cls_dir / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(FileNotFoundError, match="missing 2.tar"):
        wds_spec(f"wds:{cls_dir}")
    (cls_dir / "test" / "nshards.txt").unlink()  # without nshards.txt: every *.tar, numeric order
    assert [Path(s).name for s in wds_spec(f"wds:{cls_dir}").shards] == ["0.tar", "1.tar"]
    (ret_dir / "dataset_type.txt").unlink()  # txt without cls: retrieval
    assert wds_spec(f"wds:{ret_dir}").tasks == ("retrieval",)
    (ret_dir / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="multilabel"):
        wds_spec(f"wds:{ret_dir}")
    (cls_dir / "zeroshot_classification_templates.txt").unlink()
    with pytest.raises(FileNotFoundError, match="zeroshot_classification_templates.txt"):
        wds_spec(f"wds:{cls_dir}")
    with pytest.raises(FileNotFoundError, match="no test/"):
        wds_spec(f"wds:{tmp_path}")


def test_templates_and_caption_lines_as_clip_benchmark_reads_them():
    for t in TEMPLATES:
        assert clipforge_templates([t])[0].format("sea lion") == t.format(c="sea lion")
    with pytest.raises(ValueError, match="placeholder"):
        clipforge_templates(["a photo"])
    caps, dropped = split_caption_lines([["one\ntwo\n\nthree"], ["  "]])
    assert caps == [["one", "two", "three"], []] and dropped == 2
