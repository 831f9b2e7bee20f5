"""The feature cache keys a local shard by its absolute path: a relative and an absolute spelling of the
same file (or a ``file://`` URL) hit the same cache entry instead of recomputing the frozen towers."""

from __future__ import annotations

import os

from tiny_model import make_tiny

from clipforge.train import cache as cache_mod
from clipforge.train.cache import load_or_build_cache


def test_relative_absolute_and_file_url_share_one_entry(flickr_slice, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    absolute = flickr_slice[0]
    monkeypatch.chdir(os.path.dirname(absolute))
    relative = os.path.basename(absolute)
    assert cache_mod._shard_file(root, relative) == cache_mod._shard_file(root, absolute)
    assert cache_mod._shard_file(root, "file://" + absolute) == cache_mod._shard_file(root, absolute)
    assert cache_mod._shard_file(root, "./" + relative) == cache_mod._shard_file(root, absolute)

    model = make_tiny(lock_image=1, lock_text=1).eval()
    data, _ = load_or_build_cache(model, [relative], root, workers=0, batch_size=16, progress=False)

    def boom(*a, **k):
        raise AssertionError("the absolute path should have hit the relative path's cache entry")

    monkeypatch.setattr(cache_mod, "compute_shards", boom)
    again, _ = load_or_build_cache(model, [absolute], root, workers=0, batch_size=16, progress=False)
    assert again.keys == data.keys


def test_another_file_at_another_path_still_misses(flickr_slice, tmp_path):
    root = tmp_path / "cache"
    assert cache_mod._shard_file(root, flickr_slice[0]) != cache_mod._shard_file(root, flickr_slice[1])
