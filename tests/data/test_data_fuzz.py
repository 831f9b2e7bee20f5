"""Bad-input fuzz test (exact kept/reported counts, 0 and 2 DataLoader workers) and exact resume."""

from __future__ import annotations

import random
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from data_testutils import image_bytes, write_tar
from torch.utils.data import DataLoader

from clipforge.data.dataset import DataPosition, ShardDataset, collate, record_bad
from clipforge.data.report import BadSampleReport


def png_bomb(w: int = 200_000, h: int = 200_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (far over Pillow's MAX_IMAGE_PIXELS)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _bad_sample(kind: str, key: str, rng: random.Random) -> dict[str, bytes]:
    jpg = image_bytes(24, 16, seed=rng.randrange(1000))
    txt = f"a caption for {key}".encode()
    return {
        "corrupt_image": {"jpg": bytes(rng.randrange(256) for _ in range(300)), "txt": txt},
        "truncated_image": {"jpg": jpg[: len(jpg) // 2], "txt": txt},
        "zero_byte_image": {"jpg": b"", "txt": txt},
        "decompression_bomb": {"png": png_bomb(), "txt": txt},
        "empty_caption": {"jpg": jpg, "txt": b""},
        "whitespace_caption": {"jpg": jpg, "txt": b" \n\t  "},
        "non_utf8_caption": {"jpg": jpg, "txt": b"caf\xe9 \xff\xfe"},
        "huge_caption": {"jpg": jpg, "txt": b"word " * 20_000},  # 100 KB
        "missing_image": {"txt": txt, "json": b'{"source": "x"}'},
        "missing_caption": {"jpg": jpg, "json": b'{"source": "x"}'},
        "bad_json": {"jpg": jpg, "txt": txt, "json": b"{not json"},
    }[kind] | {"__key__": key}


# what the data layer reports for each injected defect
REASON = {
    "corrupt_image": "corrupt_image",
    "truncated_image": "corrupt_image",
    "zero_byte_image": "empty_image",
    "decompression_bomb": "decompression_bomb",
    "empty_caption": "empty_caption",
    "whitespace_caption": "empty_caption",
    "non_utf8_caption": "caption_not_utf8",
    "huge_caption": "caption_too_long",
    "missing_image": "missing_image",
    "missing_caption": "missing_caption",
    "bad_json": "bad_json",
}


def build_fuzz_shards(root: Path, seed: int = 1234, per_shard: int = 30, shards: int = 3):
    """Shards with a seeded mix of good and every kind of bad sample; the last shard is truncated
    inside one sample's image. Returns (urls, expected kept keys, expected Counter of reasons)."""
    rng = random.Random(seed)
    kinds = list(REASON)
    urls, kept, expected = [], set(), Counter()
    for s in range(shards):
        plan = ["good"] * (per_shard - len(kinds)) + kinds  # every kind at least once per shard
        rng.shuffle(plan)
        samples = []
        for i, kind in enumerate(plan):
            key = f"s{s}-{i:03d}"
            if kind == "good":
                samples.append(
                    {
                        "__key__": key,
                        "jpg": image_bytes(24, 16, seed=rng.randrange(1000)),
                        "txt": f"good {key}".encode(),
                    }
                )
            else:
                samples.append(_bad_sample(kind, key, rng))
        path = write_tar(root / f"fuzz-{s:06d}.tar", samples)
        cut_at = len(plan) if s < shards - 1 else rng.randrange(per_shard // 3, per_shard - 1)
        if s == shards - 1:  # truncate inside the first member of sample `cut_at`
            with tarfile.open(path) as tf:
                first = next(m for m in tf.getmembers() if m.name.startswith(f"s{s}-{cut_at:03d}."))
            path.write_bytes(path.read_bytes()[: first.offset_data + max(first.size // 2, 1)])
            expected["truncated_shard"] += 1
        for kind, smp in zip(plan[:cut_at], samples[:cut_at]):
            if kind == "good":
                kept.add(smp["__key__"])
            else:
                expected[REASON[kind]] += 1
        urls.append(str(path))
    return urls, kept, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_fuzz_exact_counts(tmp_path: Path, workers: int) -> None:
    urls, kept, expected = build_fuzz_shards(tmp_path)
    assert set(expected) == set(REASON.values()) | {"truncated_shard"}, "every defect kind is exercised"
    ds = ShardDataset(urls, shuffle_buffer=8, seed=3)
    loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate)
    report, got = BadSampleReport(), []
    for batch in loader:
        record_bad(batch, report)
        got.extend(batch.get("key", []))
        assert batch["size"] == len(batch.get("key", []))
    assert len(got) == len(set(got)) == len(kept)
    assert set(got) == kept
    assert report.counts == expected
    assert report.total == sum(expected.values())


def test_fuzz_sample_split_and_max_caption(tmp_path: Path) -> None:
    """Sample-wise split (more slots than shards) loses and duplicates nothing either."""
    urls, kept, expected = build_fuzz_shards(tmp_path, seed=99, per_shard=20, shards=1)
    report, got = BadSampleReport(), []
    for rank in range(3):
        ds = ShardDataset(urls, split="sample", rank=rank, world_size=3, report=report)
        got.extend(s["key"] for s in ds if "key" in s)
    assert sorted(got) == sorted(kept)
    # the truncated-shard record is seen by every rank reading that shard
    assert report.counts == expected + Counter({"truncated_shard": 2})


def test_exact_resume_shuffled_multiworker(tmp_path: Path) -> None:
    rng = random.Random(0)
    urls, all_keys = [], set()
    for s in range(4):
        samples = [
            {"__key__": f"r{s}-{i:02d}", "jpg": image_bytes(8, 8, seed=rng.randrange(99)), "txt": b"x"}
            for i in range(23)
        ]
        all_keys |= {x["__key__"] for x in samples}
        urls.append(str(write_tar(tmp_path / f"r-{s}.tar", samples)))

    def loader(position: dict | None = None) -> DataLoader:
        ds = ShardDataset(urls, shuffle_shards=True, shuffle_buffer=7, seed=42)
        if position is not None:
            ds.load_position(position)
        return DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate, prefetch_factor=4)

    first, pos = [], DataPosition()
    it = iter(loader())
    for _ in range(9):  # workers have prefetched well beyond this point
        batch = next(it)
        pos.update(batch)
        first.extend(batch["key"])
    del it
    state = pos.state_dict()
    second = [k for batch in loader(state) for k in batch.get("key", [])]
    assert len(first) == 36 and len(second) == len(all_keys) - 36
    assert sorted(first + second) == sorted(all_keys), "every key exactly once"
    with pytest.raises(ValueError, match="data slots"):
        ds = ShardDataset(urls)
        ds.load_position(state)
        next(iter(ds))  # 1 slot here vs 2 in the checkpoint


def test_bomb_between_1x_and_2x_limit_is_skipped(monkeypatch) -> None:
    """Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; we skip those too (no global warning filter)."""
    from PIL import Image

    from clipforge.data.decode import SkipSample, decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(SkipSample) as e:
        decode_image(image_bytes(12, 12, "PNG"))  # 144 px: 1.44x the limit
    assert e.value.reason == "decompression_bomb"
    with pytest.raises(SkipSample) as e:
        decode_image(image_bytes(15, 15, "PNG"))  # 225 px: > 2x, Pillow raises
    assert e.value.reason == "decompression_bomb"
    assert decode_image(image_bytes(10, 10, "PNG")).size == (10, 10)
