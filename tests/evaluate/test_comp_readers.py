"""Published-benchmark readers (SugarCrepe / Winoground / ARO layouts) on tiny fixture dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from evalutils import TinyClip
from PIL import Image

from clipforge.evaluate import readers
from clipforge.evaluate.compositionality import run_compositionality


def _img(path: Path, color: tuple[int, int, int], size: int = 20) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path.name


def _cfg(source: str, root: Path, out: Path) -> dict:
    return {"source": source, "source_dir": str(root), "output": str(out), "progress": False, "bootstrap": 20}


def test_sugar_crepe(tmp_path: Path) -> None:
    root = tmp_path / "sc"
    a = _img(root / "val2017" / "000000000001.jpg", (200, 10, 10))
    b = _img(root / "val2017" / "000000000002.jpg", (10, 10, 200))
    (root / "swap_att.json").write_text(json.dumps({
        "0": {"filename": a, "caption": "a red cube near a blue ball", "negative_caption": "a blue cube near a red ball"},
        "5": {"filename": b, "caption": "a blue ball", "negative_caption": "a red ball"},
        "7": {"filename": "../../escape.jpg", "caption": "x", "negative_caption": "y"},
        "8": {"caption": "no file"},
    }))  # fmt: skip
    (root / "add_obj.json").write_text(json.dumps({"1": {"filename": a, "caption": "a cube",
                                                         "negative_caption": "a cube and a dog"}}))  # fmt: skip
    items, skipped = readers.read_sugar_crepe(root)
    assert [it["id"] for it in items] == ["add_obj/1", "swap_att/0", "swap_att/5"]
    assert skipped["bad_record"] == 2 and skipped["missing_split:replace_obj"] == 1
    rep = run_compositionality(TinyClip().eval(), _cfg("sugar_crepe", root, tmp_path / "out"))
    n = {r["task"]: r["metrics"]["n_items"] for r in rep["results"]}
    assert n == {"compositionality/add_obj": 1, "compositionality/swap_att": 2}
    assert len((tmp_path / "out" / "probes.jsonl").read_text().splitlines()) == 3
    with pytest.raises(FileNotFoundError, match="SugarCrepe"):
        readers.read_sugar_crepe(tmp_path)


def test_winoground(tmp_path: Path) -> None:
    root = tmp_path / "wg"
    for name, c in (("ex_0_img_0", (200, 0, 0)), ("ex_0_img_1", (0, 0, 200))):
        _img(root / "images" / f"{name}.png", c)
    rows = [
        {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "red square",
         "caption_1": "square red", "tag": "Object"},
        {"id": 1, "image_0": "ex_0_img_0", "caption_0": "missing fields"},
    ]  # fmt: skip
    (root / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items, skipped = readers.read_winoground(root)
    assert len(items) == 1 and skipped["bad_record"] == 1
    assert items[0]["images"][1].endswith("ex_0_img_1.png")
    rep = run_compositionality(TinyClip().eval(), _cfg("winoground", root, tmp_path / "out"))
    m = rep["results"][0]["metrics"]
    assert rep["results"][0]["task"] == "compositionality/winoground" and m["n_items"] == 1
    assert m["group_score"] <= min(m["text_score"], m["image_score"])


def test_aro_crops_to_the_box(tmp_path: Path) -> None:
    root = tmp_path / "aro"
    img = Image.new("RGB", (40, 20), (0, 0, 200))
    img.paste((200, 0, 0), (0, 0, 20, 20))  # left half red
    (root / "images").mkdir(parents=True)
    img.save(root / "images" / "1.jpg")
    rel = [
        {"image_path": "1.jpg", "bbox_x": 0, "bbox_y": 0, "bbox_w": 20, "bbox_h": 20,
         "true_caption": "the horse is eating the grass", "false_caption": "the grass is eating the horse",
         "relation_name": "eating"},
        {"image_path": "1.jpg", "true_caption": "no box"},
    ]  # fmt: skip
    (root / "visual_genome_relation.json").write_text(json.dumps(rel))
    items, skipped = readers.read_aro(root)
    assert len(items) == 1 and items[0]["box"] == [0, 0, 20, 20] and skipped["bad_record"] == 1
    rep = run_compositionality(TinyClip().eval(), _cfg("aro", root, tmp_path / "out"))
    assert rep["results"][0]["task"] == "compositionality/vg_relation"
    assert rep["results"][0]["metrics"]["n_items"] == 1


def test_unreadable_image_is_counted(tmp_path: Path) -> None:
    root = tmp_path / "sc"
    a = _img(root / "val2017" / "a.jpg", (200, 10, 10))
    (root / "val2017" / "broken.jpg").write_bytes(b"not an image")
    (root / "swap_obj.json").write_text(json.dumps({
        "0": {"filename": a, "caption": "a dog on a cat", "negative_caption": "a cat on a dog"},
        "1": {"filename": "broken.jpg", "caption": "a dog on a cat", "negative_caption": "a cat on a dog"},
    }))  # fmt: skip
    rep = run_compositionality(TinyClip().eval(), _cfg("sugar_crepe", root, tmp_path / "out"))
    assert rep["results"][0]["metrics"]["n_items"] == 1
    assert rep["bad_samples"]["item_without_image"] == 1
    assert any(k.startswith("unreadable_image") for k in rep["bad_samples"])
