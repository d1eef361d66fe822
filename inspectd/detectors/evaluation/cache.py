"""On-disk score cache for resumable evaluation runs: image score + anomaly map (float32 .npz, never pickle) per
(model, dataset, image file state, detector + config hash, shots, seed), so a re-run with other metrics skips CLIP.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inspectd import atomic

CACHE_FORMAT = 2  # 2: maps stored as float32 exactly as scored (1 stored float16, which moved pixel AP)


@dataclass(frozen=True)
class CacheKey:
    """Everything a cached score depends on. ``image`` is `image_fingerprint` (path, mtime, size)."""

    model_id: str
    dataset: str
    image: str
    detector: str
    config_hash: str
    shots: int
    seed: int

    def as_json(self) -> str:
        return json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()


def image_fingerprint(path: str | Path) -> str:
    """The image's absolute path with its mtime (ns) and size: editing or replacing the file invalidates entries."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_mtime_ns}|{st.st_size}"


class ScoreCache:
    """Directory of ``<digest[:2]>/<digest>.npz`` files, each holding ``key`` (its JSON, checked on read),
    ``score`` (float64) and optionally ``map`` (float32, the detector's own output precision), so metrics from a
    cached run equal a fresh run's exactly. Entries of another cache format are misses. Writes are atomic
    (temp file + rename), so an interrupted run never leaves a torn entry.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*, model_id: str, dataset: str, image_path: str | Path, detector: str, config_hash: str, shots: int,
            seed: int) -> CacheKey:
        return CacheKey(model_id, dataset, image_fingerprint(image_path), detector, config_hash, int(shots), int(seed))

    def _path(self, key: CacheKey) -> Path:
        digest = key.digest
        return self.root / digest[:2] / f"{digest}.npz"

    def __contains__(self, key: CacheKey) -> bool:
        return self._path(key).is_file()

    def get(self, key: CacheKey) -> tuple[float, np.ndarray | None] | None:
        """(score, map as float32 or None) or None on a miss (also for an unreadable or foreign entry)."""
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key.as_json() or int(data.get("format", 1)) != CACHE_FORMAT:
                    self.misses += 1
                    return None
                score = float(data["score"])
                anomaly_map = data["map"].astype(np.float32) if "map" in data.files else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.misses += 1
            return None
        self.hits += 1
        return score, anomaly_map

    def put(self, key: CacheKey, score: float, anomaly_map: np.ndarray | None = None) -> None:
        arrays: dict[str, np.ndarray] = {"key": np.array(key.as_json()), "score": np.array(float(score)),
                                         "format": np.array(CACHE_FORMAT)}
        if anomaly_map is not None:
            m = np.asarray(anomaly_map)
            if not np.isfinite(m).all():
                raise ValueError("anomaly map contains NaN or infinite values")
            arrays["map"] = m.astype(np.float32)
        path = self._path(key)
        with atomic.replacing(path) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.npz"))
