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

from inspectd.daemon.config import ProductConfig, RegistryConfig, ThresholdConfig
from inspectd.detectors.backbone import ClipBackbone
from inspectd.detectors.base import Detector, ProductSpec, ProductState, create_detector
from inspectd.detectors.pipeline import ScoreItem, run
from inspectd.streams.codec import decode_image_bytes
from inspectd.streams.records import MaskPolicy

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CALIBRATION_CHUNK = 16

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
    mask_policy: MaskPolicy  # parsed from config.mask once, at build time

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


def shifted_views(image: np.ndarray, keep: float = 0.92) -> list[np.ndarray]:
    """Four corner crops keeping ``keep`` of each side, resized back: small placement/scale changes."""
    from PIL import Image

    h, w = image.shape[:2]
    ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
    pil = Image.fromarray(image)
    views = []
    for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
        crop = pil.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        views.append(np.asarray(crop))
    return views


def calibrate(detector: Detector, spec: ProductSpec, references: list[np.ndarray], holdout: list[np.ndarray],
              full_state: ProductState, policy: ThresholdConfig) -> tuple[float, dict]:
    """Threshold from normal scores: leave-one-out over references (k >= 2) plus held-out goods
    (k = 1 without a holdout: shifted views of the one reference).

    Each left-out reference is scored against a state fitted on the other k-1, so its score is what an
    unseen good part would get (slightly pessimistic: k-1 memories, not k). Held-out goods are scored
    against the full state. threshold = quantile(normal scores) + margin; a fixed value overrides.
    """
    if policy.value is not None:
        return float(policy.value), {"method": "fixed"}
    if not 0.0 <= policy.quantile <= 1.0:
        raise BuildError(f"threshold.quantile must be within [0, 1], got {policy.quantile}")
    normal_scores: list[float] = []
    loo_scores: list[float] = []
    if len(references) >= 2:
        for i in range(len(references)):
            state = detector.fit(spec, references[:i] + references[i + 1:])
            loo_scores.append(run(detector.backbone, [ScoreItem(detector, state, references[i])])[0].score)
        normal_scores += loo_scores
    for start in range(0, len(holdout), CALIBRATION_CHUNK):  # bounded memory for large holdout dirs
        chunk = holdout[start:start + CALIBRATION_CHUNK]
        normal_scores += [o.score for o in run(detector.backbone, [ScoreItem(detector, full_state, image)
                                                                    for image in chunk])]
    shifted: list[float] = []
    if len(references) == 1 and not holdout:
        # One reference and nothing held out: its own score is 0 by construction, so score slightly
        # shifted views of it (what the next good part, placed a little differently, looks like).
        views = shifted_views(references[0])
        shifted = [o.score for o in run(detector.backbone, [ScoreItem(detector, full_state, v) for v in views])]
        normal_scores += shifted
    if not normal_scores:
        (log.warning if references else log.info)(
            "product %s: no normals to calibrate on (k=%d, no holdout_dir); threshold = default %.3f",
            spec.product, len(references), policy.default)
        return float(policy.default), {"method": "default", "reason": "no normals to calibrate on "
                                       "(needs >= 2 references or a holdout_dir)"}
    threshold = float(np.quantile(normal_scores, policy.quantile)) + policy.margin
    return threshold, {"method": "quantile", "quantile": policy.quantile, "margin": policy.margin,
                       "normals": len(normal_scores), "leave_one_out": len(loo_scores),
                       "holdout": len(holdout), "shifted_views": len(shifted),
                       "min_normal": float(min(normal_scores)),
                       "mean_normal": float(np.mean(normal_scores)), "max_normal": float(max(normal_scores))}


class ProductRegistry:
    """The live product table. Reads (`get`) are lock-free; builds are serialised per product."""

    def __init__(self, backbone: ClipBackbone, config: RegistryConfig,
                 on_change: Callable[[ProductEntry | None, str], None] | None = None,
                 on_remove: Callable[[str], None] | None = None) -> None:
        self.backbone = backbone
        self.config = config
        self._entries: dict[str, ProductEntry] = {}
        self._status: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ready_events: dict[str, asyncio.Event] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inspectd-build")
        self._on_change = on_change  # (entry, id) on a swap; (None, id) on a rejected build
        self._on_remove = on_remove  # (id) on removal; without it removal is signalled as on_change(None, id)
        self.builds = 0  # completed builds (swaps), for tests and the admin API
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
    async def put(self, config: ProductConfig, force: bool = True) -> ProductEntry:
        """Build ``config`` and swap it in; raises BuildError (old entry keeps serving).

        With ``force=False`` (file watcher) a build whose config and reference fingerprint equal the serving
        entry's is skipped and the serving entry returned, so echoes of our own writes cost no new version.
        """
        lock = self._locks.setdefault(config.id, asyncio.Lock())
        async with lock:
            if config.id not in self._entries:
                self._status[config.id] = BUILDING
            current = None if force else self._entries.get(config.id)
            try:
                loop = asyncio.get_running_loop()
                entry = await loop.run_in_executor(self._executor, self._build, config, current)
            except Exception as exc:
                message = str(exc) if isinstance(exc, BuildError | ValueError) else f"{type(exc).__name__}: {exc}"
                log.error("product %s: build rejected: %s", config.id, message)
                self._errors[config.id] = message
                self._status[config.id] = READY if config.id in self._entries else FAILED
                if self._on_change:
                    self._on_change(None, config.id)
                raise BuildError(message) from exc
            if entry is current:
                log.info("product %s: unchanged (fingerprint %s); version %d keeps serving", config.id,
                         entry.fingerprint, entry.version)
                return entry
            self._entries[config.id] = entry  # the atomic swap
            self._status[config.id] = READY
            self._errors.pop(config.id, None)
            self.builds += 1
            self._ready_events.setdefault(config.id, asyncio.Event()).set()
            log.info("product %s: version %d ready (threshold %.4f, %s)", config.id, entry.version,
                     entry.threshold, entry.calibration.get("method"))
            if self._on_change:
                self._on_change(entry, config.id)
            return entry

    async def reload(self, product_id: str, force: bool = True) -> ProductEntry:
        """Rebuild from the serving config (references re-read); KeyError if the product is not serving."""
        entry = self._entries.get(product_id)
        if entry is None:
            raise KeyError(product_id)
        return await self.put(entry.config, force=force)

    async def remove(self, product_id: str) -> bool:
        """Stop serving ``product_id`` (waits for a build in progress); False if it was unknown."""
        lock = self._locks.setdefault(product_id, asyncio.Lock())
        async with lock:
            found = self._entries.pop(product_id, None) is not None
            known = self._status.pop(product_id, None) is not None or found
            self._errors.pop(product_id, None)
            event = self._ready_events.pop(product_id, None)
            if event:
                event.clear()
        if not known:
            return False
        log.info("product %s: removed", product_id)
        if self._on_remove:
            self._on_remove(product_id)
        elif self._on_change:
            self._on_change(None, product_id)
        return True

    def configs(self) -> list[ProductConfig]:
        return [entry.config for entry in self._entries.values()]

    # ---------------------------------------------------------------- product files (persistence)
    def product_file(self, product_id: str) -> Path | None:
        """The YAML file in products_dir defining ``product_id`` (existing, else ``<id>.yaml``); None without a dir."""
        if not self.config.products_dir:
            return None
        from inspectd.daemon.config import ConfigError, load_product_file
        from inspectd.daemon.products import PRODUCT_SUFFIXES, product_files

        root = Path(self.config.products_dir)
        for suffix in PRODUCT_SUFFIXES:
            if (root / f"{product_id}{suffix}").is_file():
                return root / f"{product_id}{suffix}"
        for path in product_files(str(root)):
            try:
                if load_product_file(path).id == product_id:
                    return path
            except (ConfigError, OSError):
                continue
        return root / f"{product_id}.yaml"

    def save_product_file(self, config: ProductConfig) -> Path | None:
        """Persist ``config`` as YAML into products_dir (atomic rename; dot-prefixed temp file)."""
        path = self.product_file(config.id)
        if path is None:
            return None
        import yaml

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(asdict(config), sort_keys=False))
        tmp.replace(path)
        return path

    def delete_product_file(self, product_id: str) -> Path | None:
        path = self.product_file(product_id)
        if path is None or not path.exists():
            return None
        path.unlink(missing_ok=True)
        return path

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

    def _build(self, config: ProductConfig, current: ProductEntry | None = None) -> ProductEntry:
        started = time.perf_counter()
        try:
            detector = create_detector(config.detector, self.backbone, config.options)
            mask_policy = MaskPolicy.parse(config.mask)
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
        files = reference_files(config.references, config.shots)
        holdout_files = reference_files(config.threshold.holdout_dir, 10**6) if config.threshold.holdout_dir else []
        fingerprint = self._fingerprint(detector, config, files, holdout_files)
        if current is not None and current.fingerprint == fingerprint and current.config == config:
            return current
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
                            time.time(), dict(state.meta.get("calibration", {})), mask_policy)

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
