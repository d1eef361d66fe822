"""Score cache: exact float32 round trip as npz without pickle, keyed by everything a score depends on."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from inspectd.detectors.evaluation.cache import ScoreCache


def _key(cache: ScoreCache, image: Path, **over):
    args = dict(model_id="ViT-B-16-plus-240/laion400m_e32", dataset="mvtec_ad", image_path=image,
                detector="winclip", config_hash="abc123", shots=1, seed=0)
    args.update(over)
    return cache.key(**args)


def test_round_trip_is_exact_float32_storage(tmp_path: Path) -> None:
    image = tmp_path / "000.png"
    image.write_bytes(b"not really a png")
    cache = ScoreCache(tmp_path / "cache")
    key = _key(cache, image)
    assert cache.get(key) is None and key not in cache and cache.misses == 1
    rng = np.random.default_rng(0)
    m = rng.random((240, 240)).astype(np.float32)
    cache.put(key, 0.8125, m)
    assert key in cache and len(cache) == 1
    score, got = cache.get(key)
    assert score == 0.8125 and got.dtype == np.float32 and got.shape == (240, 240)
    assert np.array_equal(got, m)  # exact: cached metrics equal a fresh run's
    (path,) = (tmp_path / "cache").glob("*/*.npz")
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["format.npy", "key.npy", "map.npy", "score.npy"]
    with np.load(path, allow_pickle=False) as data:  # loads without pickle
        assert data["map"].dtype == np.float32
    cache.put(_key(cache, image, detector="randword"), 0.3)  # image-level only detector
    assert cache.get(_key(cache, image, detector="randword")) == (0.3, None)
    big = np.full((2, 2), 1e6)  # large values survive
    cache.put(_key(cache, image, seed=9), 1.0, big)
    assert cache.get(_key(cache, image, seed=9))[1][0, 0] == 1e6


@pytest.mark.parametrize("change", ["model_id", "dataset", "detector", "config_hash", "shots", "seed", "file"])
def test_every_key_part_separates_entries(tmp_path: Path, change: str) -> None:
    image = tmp_path / "000.png"
    image.write_bytes(b"abc")
    cache = ScoreCache(tmp_path / "cache")
    cache.put(_key(cache, image), 0.5, np.zeros((4, 4), np.float32))
    if change == "file":
        image.write_bytes(b"abcd")  # new size and mtime
        os.utime(image, ns=(1, 1))
        other = _key(cache, image)
    else:
        other = _key(cache, image, **{change: 2 if change in ("shots", "seed") else "other"})
    assert cache.get(other) is None
    if change != "file":
        assert cache.get(_key(cache, image))[0] == 0.5


def test_corrupt_entry_is_a_miss(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"x")
    cache = ScoreCache(tmp_path)
    key = _key(cache, image)
    cache.put(key, 0.1)
    next(tmp_path.glob("*/*.npz")).write_bytes(b"garbage")
    assert cache.get(key) is None
    with pytest.raises(ValueError):
        cache.put(key, 0.1, np.array([[np.nan]]))


def test_entries_of_the_old_float16_format_are_misses(tmp_path: Path) -> None:
    image = tmp_path / "000.png"
    image.write_bytes(b"abc")
    cache = ScoreCache(tmp_path / "cache")
    key = _key(cache, image)
    cache.put(key, 0.5, np.zeros((4, 4), np.float32))
    (path,) = (tmp_path / "cache").glob("*/*.npz")
    np.savez_compressed(path, key=np.array(key.as_json()), score=np.array(0.5), map=np.zeros((4, 4), np.float16))
    assert cache.get(key) is None and cache.misses == 1
