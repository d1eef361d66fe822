"""Product registry: product id -> (detector, ProductState, version, threshold), rebuilt off the hot path.

A build (load references, fit, calibrate the threshold) runs in a worker thread while the engine keeps
scoring with the old entry; the new entry replaces the old one in one assignment, so a batch sees
either the old or the new version, never a mix. A failed build leaves the old entry serving.
Fitted states are cached on disk (safetensors) under a hash of model, detector config, product text
and reference file contents, so a restart does not recompute memory banks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inspectd.daemon.config import ProductConfig, RegistryConfig
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import Detector, ProductSpec, ProductState, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.streams.codec import decode_image_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

READY = "ready"
BUILDING = "building"
FAILED = "failed"


class BuildError(ValueError):
    """A product definition or reference set that cannot be built; the old state keeps serving."""


@dataclass(frozen=True)
class ProductEntry:
    """Everything the engine needs to score one product's frames; replaced whole, never mutated."""

    config: ProductConfig
    detector: Detector
    state: ProductState
    version: int
    threshold: float
    fingerprint: str
    built_at: float
    calibration: dict

    @property
    def id(self) -> str:
        return self.config.id

    def describe(self) -> dict:
        return {
            "id": self.id, "version": self.version, "detector": self.config.detector,
            "threshold": self.threshold, "fingerprint": self.fingerprint, "built_at": self.built_at,
            "shots": self.state.meta.get("shots", 0), "calibration": self.calibration,
            "config": asdict(self.config),
        }


def reference_files(directory: str | None, shots: int) -> list[Path]:
    if shots <= 0 or not directory:
        return []
    root = Path(directory)
    if not root.is_dir():
        raise BuildError(f"reference directory {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise BuildError(f"reference directory {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:shots]


def load_images(files: list[Path]) -> list[np.ndarray]:
    images = []
    for path in files:
        try:
            images.append(decode_image_bytes(path.read_bytes()))
        except Exception as exc:  # noqa: BLE001 - FrameError and OS errors alike
            raise BuildError(f"reference image {path.name} cannot be read: {exc}") from exc
    return images


def calibrate(detector: Detector, spec: ProductSpec, references: list[np.ndarray], holdout: list[np.ndarray],
              full_state: ProductState, policy) -> tuple[float, dict]:
    """Threshold from normal scores: leave-one-out over references (k >= 2) plus held-out goods."""
    if policy.value is not None:
        return float(policy.value), {"method": "fixed"}
    normal_scores: list[float] = []
    if len(references) >= 2:
        for i in range(len(references)):
            state = detector.fit(spec, references[:i] + references[i + 1:])
            normal_scores.append(run(detector.backbone, [ScoreItem(detector, state, references[i])])[0].score)
    if holdout:
        outputs = run(detector.backbone, [ScoreItem(detector, full_state, image) for image in holdout])
        normal_scores += [o.score for o in outputs]
    if not normal_scores:
        return float(policy.default), {"method": "default", "reason": "no normals to calibrate on"}
    threshold = float(np.quantile(normal_scores, policy.quantile)) + policy.margin
    return threshold, {"method": "quantile", "quantile": policy.quantile, "margin": policy.margin,
                       "normals": len(normal_scores), "max_normal": float(max(normal_scores))}


class ProductRegistry:
    """The live product table. Reads (`get`) are lock-free; builds are serialised per product."""

    def __init__(self, backbone: ClipBackbone, config: RegistryConfig,
                 on_change: Callable[[ProductEntry | None, str], None] | None = None) -> None:
        self.backbone = backbone
        self.config = config
        self._entries: dict[str, ProductEntry] = {}
        self._status: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready_events: dict[str, asyncio.Event] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspectd-build")
        self._on_change = on_change
        self.cache_dir = Path(config.state_cache_dir) if config.state_cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- reads (hot path)
    def get(self, product_id: str) -> ProductEntry | None:
        return self._entries.get(product_id)

    def status(self, product_id: str) -> str | None:
        return self._status.get(product_id)

    def error(self, product_id: str) -> str | None:
        return self._errors.get(product_id)

    def ids(self) -> list[str]:
        return sorted(set(self._entries) | set(self._status))

    def all_ready(self) -> bool:
        return all(s == READY for s in self._status.values()) if self._status else True

    async def wait_ready(self, product_id: str, timeout: float) -> ProductEntry | None:
        event = self._ready_events.setdefault(product_id, asyncio.Event())
        if product_id in self._entries:
            return self._entries[product_id]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
        return self._entries.get(product_id)

    # ---------------------------------------------------------------- writes (off the hot path)
    async def put(self, config: ProductConfig) -> ProductEntry:
        """Build ``config`` and swap it in; raises BuildError (old entry keeps serving)."""
        lock = self._locks.setdefault(config.id, asyncio.Lock())
        async with lock:
            previous_status = self._status.get(config.id)
            if config.id not in self._entries:
                self._status[config.id] = BUILDING
            try:
                loop = asyncio.get_running_loop()
                entry = await loop.run_in_executor(self._executor, self._build, config)
            except Exception as exc:
                message = str(exc) if isinstance(exc, BuildError | ValueError) else f"{type(exc).__name__}: {exc}"
                log.error("product %s: build rejected: %s", config.id, message)
                self._errors[config.id] = message
                if config.id in self._entries:
                    self._status[config.id] = READY
                elif previous_status is None:
                    self._status[config.id] = FAILED
                if self._on_change:
                    self._on_change(None, config.id)
                raise BuildError(message) from exc
            self._entries[config.id] = entry  # the atomic swap
            self._status[config.id] = READY
            self._errors.pop(config.id, None)
            self._ready_events.setdefault(config.id, asyncio.Event()).set()
            log.info("product %s: version %d ready (threshold %.4f, %s)", config.id, entry.version,
                     entry.threshold, entry.calibration.get("method"))
            if self._on_change:
                self._on_change(entry, config.id)
            return entry

    async def reload(self, product_id: str) -> ProductEntry:
        entry = self._entries.get(product_id)
        if entry is None:
            raise KeyError(product_id)
        return await self.put(entry.config)

    async def remove(self, product_id: str) -> bool:
        found = self._entries.pop(product_id, None) is not None
        self._status.pop(product_id, None)
        self._errors.pop(product_id, None)
        event = self._ready_events.pop(product_id, None)
        if event:
            event.clear()
        if self._on_change:
            self._on_change(None, product_id)
        return found

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- building
    def _fingerprint(self, detector: Detector, config: ProductConfig, files: list[Path], holdout: list[Path]) -> str:
        digest = hashlib.sha256()
        digest.update(detector.config_fingerprint().encode())
        text = {"object": config.object_name, "defects": config.defect_words, "shots": config.shots,
                "threshold": asdict(config.threshold), "detector": config.detector}
        digest.update(json.dumps(text, sort_keys=True).encode())
        for path in [*files, *holdout]:
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:20]

    def _build(self, config: ProductConfig) -> ProductEntry:
        started = time.perf_counter()
        try:
            detector = create_detector(config.detector, self.backbone, config.options)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        files = reference_files(config.references, config.shots)
        holdout_files = reference_files(config.threshold.holdout_dir, 10**6) if config.threshold.holdout_dir else []
        fingerprint = self._fingerprint(detector, config, files, holdout_files)
        spec = ProductSpec(config.id, config.object_name, tuple(config.defect_words))
        state = self._load_cached(config.id, fingerprint)
        if state is None:
            references = load_images(files)
            state = detector.fit(spec, references)
            threshold, calibration = calibrate(detector, spec, references, load_images(holdout_files), state,
                                               config.threshold)
            state.meta.update({"threshold": threshold, "calibration": calibration, "fingerprint": fingerprint})
            self._store_cached(config.id, fingerprint, state)
        threshold = float(state.meta["threshold"]) if config.threshold.value is None else config.threshold.value
        version = self._versions.get(config.id, 0) + 1
        self._versions[config.id] = version
        log.info("product %s: built in %.2fs", config.id, time.perf_counter() - started)
        return ProductEntry(config, detector, state.to(self.backbone.device), version, threshold, fingerprint,
                            time.time(), dict(state.meta.get("calibration", {})))

    def _cache_path(self, product_id: str, fingerprint: str) -> Path | None:
        if self.cache_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in product_id)
        return self.cache_dir / f"{safe}-{fingerprint}.safetensors"

    def _load_cached(self, product_id: str, fingerprint: str) -> ProductState | None:
        path = self._cache_path(product_id, fingerprint)
        if path is None or not path.exists():
            return None
        try:
            state = ProductState.load(path)
            if state.meta.get("fingerprint") != fingerprint or "threshold" not in state.meta:
                raise ValueError("fingerprint mismatch")
            log.info("product %s: state loaded from cache %s", product_id, path.name)
            return state
        except Exception as exc:  # noqa: BLE001 - any corrupt file is rebuilt, never fatal
            log.warning("product %s: cached state %s unusable (%s); rebuilding", product_id, path.name, exc)
            path.unlink(missing_ok=True)
            return None

    def _store_cached(self, product_id: str, fingerprint: str, state: ProductState) -> None:
        path = self._cache_path(product_id, fingerprint)
        if path is not None:
            try:
                state.save(path)
            except OSError as exc:
                log.warning("product %s: cannot write state cache %s: %s", product_id, path, exc)
